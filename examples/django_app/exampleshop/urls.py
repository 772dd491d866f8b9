from django.contrib.auth.models import User
from django.core.mail import EmailMultiAlternatives
from django.db import transaction
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

import mailqueue
from mailqueue.contrib.status import anymail_statuses


@csrf_exempt
def signup(request):
    """Create a user and queue the welcome mail in one transaction.

    ``?fail=1`` raises after both: the user and the mail vanish together.
    """
    try:
        with transaction.atomic():
            user = User.objects.create(
                username=request.POST["username"], email=request.POST["email"]
            )
            welcome = EmailMultiAlternatives(
                "Welcome!",
                f"Hello {user.username}.",
                to=[user.email],
                headers={
                    "X-Mailqueue-Idempotency-Key": f"welcome-{user.pk}",
                    "X-Mailqueue-Tags": "welcome",
                },
            )
            welcome.attach_alternative(f"<h1>Hello {user.username}</h1>", "text/html")
            welcome.send()
            if request.GET.get("fail"):
                raise RuntimeError("something went wrong after the mail was 'sent'")
    except RuntimeError as exc:
        return JsonResponse({"error": str(exc), "users": User.objects.count()}, status=500)
    return JsonResponse({"user": user.pk, "mailqueue_id": welcome.mailqueue_id})


def status(request, user_id):
    info = mailqueue.get_status_by_key(f"welcome-{user_id}")
    return JsonResponse(
        {
            "status": info.status,
            "anymail": sorted(anymail_statuses(info)),
            "recipients": [
                {"address": r.address, "status": r.status, "code": r.smtp_code, "reply": r.reply}
                for r in info.recipients
            ],
        }
    )


urlpatterns = [path("signup/", signup), path("status/<int:user_id>/", status)]
