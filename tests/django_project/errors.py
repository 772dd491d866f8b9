"""A view that fails, for the end-to-end test of Django's 500-error mail to ``ADMINS``."""

from django.http import HttpRequest, HttpResponse


def broken(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the broken view broke, as it was written to")
