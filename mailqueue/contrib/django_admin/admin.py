"""The admin pages: messages (list, message page, Retry and Cancel) and relay pauses.

Read-only: no add, no change, no delete. The only writes are the two actions,
and they go through ``mailqueue.api`` (``retry``, ``cancel``), the same calls
as ``mailqueue retry``/``mailqueue cancel``, so the rules that keep a sent
recipient from being sent twice hold here too.

Why each choice (a million rows must answer in milliseconds):

* ``CappedPaginator`` counts at most ``COUNT_CAP`` rows (``SELECT COUNT(*)
  FROM (SELECT ... LIMIT cap+1)``), never the whole table, and
  ``show_full_result_count = False`` drops the second count Django makes.
* Newest first on ``(created_at, id)``; every filter has an index that ends
  with ``(created_at, id)`` (migrations 0001, 0003), so one page reads one
  page of index. Column sorting is limited to ``created_at``.
* Filter choices come from ``mailqueue.statuses`` and the configured relays,
  and the tag is typed in: nothing scans the table to list choices, and
  Django's facet counts are off.
* Search is by a recipient's exact address through ``ix_mq_recipient_address``
  (``id IN (SELECT message_id ... WHERE address = ...)``), or a message id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings as django_settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from ... import api
from ...config import Settings
from ...errors import NotFoundError
from ...statuses import MessageStatus, RecipientStatus
from .. import CONFIG_NAMES, apply_config
from .models import Attempt, Message, Recipient, Relay, Suppression, TagOf, database_alias

__all__ = [
    "ACTION_LIMIT",
    "COUNT_CAP",
    "CappedPaginator",
    "MessageAdmin",
    "RelayAdmin",
    "SuppressionAdmin",
]

COUNT_CAP = 10_000
"""The paginator counts this many matching rows at most ("more than 10000 messages")."""
ACTION_LIMIT = 1_000
"""The most messages one Retry or Cancel takes (``mailqueue retry --failed`` does more)."""
TABLE_ROWS = 500
"""Recipients and attempts shown on a message page (``mailqueue status ID --history``: all)."""


def _mailqueue_settings() -> Settings:
    """mailqueue's settings with any ``MAILQUEUE_*`` names from Django's settings applied."""
    names = {n: getattr(django_settings, n) for n in CONFIG_NAMES if hasattr(django_settings, n)}
    return apply_config(names)


class CappedPaginator(Paginator):
    """A paginator that counts at most ``cap`` rows: page links up to there, "more than" after."""

    cap = COUNT_CAP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capped = False
        """True when more than ``cap`` rows match (``count`` is then ``cap``)."""

    @cached_property
    def count(self) -> int:
        # Only the ids, in no order: the database may count from whichever index
        # serves the filter, without reading each row's columns (or its JSON).
        found = self.object_list.values("pk").order_by()[: self.cap + 1].count()
        self.capped = found > self.cap
        return min(found, self.cap)


class MoreThan(int):
    """A count that stopped at the cap: compares as the number, reads "more than N"."""

    def __str__(self) -> str:
        return f"more than {int(self)}"

    __html__ = __str__


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(s, s) for s in MessageStatus.ALL]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(status=value) if value else queryset


class RelayFilter(admin.SimpleListFilter):
    """The relays mailqueue is configured with (and the one asked for, if it is gone since)."""

    title = "relay"
    parameter_name = "relay"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = [r.name for r in _mailqueue_settings().all_relays]
        value = self.value()
        if value and value not in names:
            names.append(value)
        return [(n, n) for n in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(relay=value) if value else queryset


class TagFilter(admin.SimpleListFilter):
    """``metadata["tag"]``, typed in: listing the tags in use would read the whole table."""

    title = "tag"
    parameter_name = "tag"
    template = "mailqueue_admin/text_filter.html"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(value, value)] if value else []

    def has_output(self) -> bool:
        return True

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(mq_tag=value) if value else queryset

    def choices(self, changelist: Any) -> Any:
        keep = changelist.get_query_string(remove=[self.parameter_name, "p"])
        yield {
            "value": self.value() or "",
            "hidden": parse_qsl(keep.lstrip("?"), keep_blank_values=True),
            "selected": bool(self.value()),
            "clear_url": changelist.get_query_string(remove=[self.parameter_name, "p"]),
        }


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return str(formats.localize(timezone.template_localtime(value)))


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


class _ChangeList(ChangeList):
    """Sorts only by ``sortable_by``, also when ``?o=`` is typed in by hand."""

    def get_ordering_field(self, field_name: Any) -> Any:
        if field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created_at",
        "status",
        "relay",
        "mail_from",
        "subject",
        "tag",
        "attempts",
        "last_error",
    )
    list_display_links = ("created_at", "subject")
    list_filter = (StatusFilter, RelayFilter, TagFilter, ("created_at", admin.DateFieldListFilter))
    search_fields = ("recipients__address",)  # shows the box; get_search_results does the work
    search_help_text = "A recipient's exact address (as stored), or a message id."
    ordering = ("-created_at", "-id")
    sortable_by = ("created_at",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedPaginator
    list_per_page = 50
    list_max_show_all = 200
    actions = ["retry_failed", "cancel_messages"]
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "status",
                    "subject",
                    "mail_from",
                    "relay",
                    "size",
                    "attempts",
                    "created_at",
                    "updated_at",
                    "next_attempt_at",
                    "expires_at",
                    "last_error",
                    "last_reply",
                    "worker",
                    "idempotency_key",
                    "list_id",
                    "meta",
                )
            },
        ),
        ("Recipients", {"fields": ("recipients_table",)}),
        ("Attempts", {"fields": ("attempts_table",)}),
        ("Headers", {"fields": ("headers",), "classes": ("collapse",)}),
    )
    readonly_fields = ("recipients_table", "attempts_table", "headers")

    # -- read-only: nothing is added, changed or deleted here --------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_steer_permission(self, request: HttpRequest) -> bool:
        """May run Retry and Cancel: the ``mailqueue.steer_message`` permission."""
        return bool(request.user.has_perm(f"{self.opts.app_label}.steer_message"))

    # -- reading ---------------------------------------------------------------------

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return _ChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return (
            super()
            .get_queryset(request)
            .using(database_alias())
            .defer("content", "meta")
            .annotate(mq_tag=TagOf("meta"))
        )

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        try:
            uuid.UUID(str(object_id))
        except ValueError:
            return None  # "not found", not a database error
        return super().get_object(request, object_id, from_field)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            pass
        by_address = Recipient.objects.using(queryset.db).filter(address=term)
        return queryset.filter(pk__in=by_address.values("message_id")), False

    @admin.display(description="tag")
    def tag(self, obj: Message) -> str:
        return _text(getattr(obj, "mq_tag", None))

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        if isinstance(response, TemplateResponse) and response.context_data:
            cl = response.context_data.get("cl")
            if cl is not None and getattr(cl.paginator, "capped", False):
                # Django's own templates then say "more than 10000 messages"
                cl.result_count = MoreThan(cl.result_count)
                response.context_data["selection_note_all"] = (
                    f"All of more than {int(cl.result_count)} selected"
                )
        return response

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        context = {**(extra_context or {}), "mq_can_steer": self.has_steer_permission(request)}
        return super().change_view(request, object_id, form_url, context)

    @admin.display(description="recipients")
    def recipients_table(self, obj: Message) -> SafeString:
        rows = list(
            Recipient.objects.using(obj._state.db)
            .filter(message_id=obj.pk)
            .order_by("id")[: TABLE_ROWS + 1]
        )
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td class='mq-status'>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    r.address,
                    r.kind,
                    r.status,
                    r.attempts,
                    _text(r.smtp_code),
                    _text(r.enhanced_code),
                    _text(r.reply),
                    _text(r.error),
                    _when(r.updated_at),
                    _when(r.sent_at),
                )
                for r in rows[:TABLE_ROWS]
            ),
        )
        return format_html(
            "<table id='mq-recipients'><thead><tr><th>address</th><th>kind</th><th>status</th>"
            "<th>attempts</th><th>code</th><th>enhanced</th><th>reply</th><th>error</th>"
            "<th>updated</th><th>sent</th></tr></thead><tbody>{}</tbody></table>{}",
            body,
            _more(rows, obj),
        )

    @admin.display(description="attempts")
    def attempts_table(self, obj: Message) -> SafeString:
        rows = list(
            Attempt.objects.using(obj._state.db)
            .filter(message_id=obj.pk)
            .select_related("recipient")
            .order_by("id")[: TABLE_ROWS + 1]
        )
        if not rows:
            return format_html("<p id='mq-attempts'>{}</p>", "No attempt yet.")
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td class='mq-status'>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    _when(a.at),
                    a.recipient.address,
                    a.status,
                    _text(a.smtp_code),
                    _text(a.enhanced_code),
                    _text(a.reply),
                    _text(a.error),
                    _text(a.worker),
                )
                for a in rows[:TABLE_ROWS]
            ),
        )
        return format_html(
            "<table id='mq-attempts'><thead><tr><th>at</th><th>address</th><th>status</th>"
            "<th>code</th><th>enhanced</th><th>reply</th><th>error</th><th>worker</th></tr>"
            "</thead><tbody>{}</tbody></table>{}",
            body,
            _more(rows, obj),
        )

    @admin.display(description="headers")
    def headers(self, obj: Message) -> SafeString:
        content = bytes(obj.content or b"")
        block = content.split(b"\r\n\r\n", 1)[0][:20_000]
        return format_html("<pre id='mq-headers'>{}</pre>", block.decode("utf-8", "replace"))

    # -- steering: Retry and Cancel through mailqueue.api --------------------------------

    def get_urls(self) -> list[Any]:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/retry/", wrap(self.retry_view), name=f"{name}_retry"),
            path("<path:object_id>/cancel/", wrap(self.cancel_view), name=f"{name}_cancel"),
            *super().get_urls(),
        ]

    @admin.action(description="Retry failed recipients", permissions=["steer"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = self._selected(request, queryset)
        if ids is not None:
            self._retry(request, ids)

    @admin.action(description="Cancel (recipients not sent yet)", permissions=["steer"])
    def cancel_messages(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = self._selected(request, queryset)
        if ids is not None:
            self._cancel(request, ids)

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._one(request, object_id, self._retry)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._one(request, object_id, self._cancel)

    def _one(self, request: HttpRequest, object_id: str, run: Any) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_steer_permission(request):
            raise PermissionDenied
        obj = self.get_object(request, object_id)
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        run(request, [obj.pk])
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[obj.pk],
            current_app=self.admin_site.name,
        )
        return HttpResponseRedirect(url)

    def _selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> list[uuid.UUID] | None:
        ids = list(queryset.values_list("pk", flat=True).order_by()[: ACTION_LIMIT + 1])
        if len(ids) > ACTION_LIMIT:
            self.message_user(
                request,
                f"Nothing done: more than {ACTION_LIMIT} messages selected. Narrow the list "
                "with the filters, or for every failed message use the command line: "
                "mailqueue retry --failed [--since 1h], mailqueue cancel --relay NAME.",
                messages.ERROR,
            )
            return None
        return ids

    def _retry(self, request: HttpRequest, ids: Sequence[uuid.UUID]) -> None:
        requeued = missing = 0
        for mid in ids:
            try:
                requeued += api.retry(str(mid))
            except NotFoundError:
                missing += 1
        left = len(ids) - requeued - missing
        text = (
            f"Retry: {requeued} of {len(ids)} message(s) requeued; "
            "their failed and deferred recipients are pending again."
        )
        if left:
            text += (
                f" {left} left as they were: no failed or deferred recipient, "
                "or a worker is sending them right now."
            )
        self.message_user(request, text, messages.SUCCESS if requeued else messages.WARNING)
        self._missing(request, missing)

    def _cancel(self, request: HttpRequest, ids: Sequence[uuid.UUID]) -> None:
        cancelled = RecipientStatus.CANCELLED
        before = dict(
            Recipient.objects.using(database_alias())
            .filter(message_id__in=ids, status=cancelled)
            .order_by()
            .values_list("message_id")
            .annotate(n=Count("id"))
        )
        recipients = changed = sending = missing = 0
        for mid in ids:
            try:
                info = api.cancel(str(mid))
            except NotFoundError:
                missing += 1
                continue
            now = sum(1 for r in info.recipients if r.status == cancelled)
            if now > before.get(mid, 0):
                changed += 1
                recipients += now - before.get(mid, 0)
            if info.status == MessageStatus.SENDING:
                sending += 1
        text = f"Cancel: {recipients} recipient(s) cancelled in {changed} of {len(ids)} message(s)."
        if changed < len(ids) - missing:
            text += f" {len(ids) - missing - changed} had nothing left to cancel."
        if sending:
            text += (
                f" {sending} message(s) are being sent by a worker right now: what it is "
                "sending may still go out, and their status is updated when it finishes."
            )
        self.message_user(request, text, messages.SUCCESS if changed else messages.WARNING)
        self._missing(request, missing)

    def _missing(self, request: HttpRequest, missing: int) -> None:
        """Rows this page read that mailqueue's own database does not hold: say which setting."""
        if not missing:
            return
        self.message_user(
            request,
            f"{missing} message(s) not found by mailqueue, left as they were: deleted since "
            f"the list was shown, or this admin reads another database (Django's "
            f"{database_alias()!r}, MAILQUEUE_DJANGO_ADMIN_DATABASE) than the one mailqueue "
            "writes (MAILQUEUE_DATABASE_URL); they must be the same.",
            messages.ERROR,
        )


def _more(rows: Sequence[Any], obj: Message) -> str:
    if len(rows) <= TABLE_ROWS:
        return ""
    return format_html(
        "<p class='help'>The first {} shown; <code>mailqueue status {} --history</code> "
        "lists all.</p>",
        TABLE_ROWS,
        obj.pk,
    )


@admin.register(Relay)
class RelayAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Relays paused after auth or TLS failures (``mailqueue relays``; resume there)."""

    list_display = ("name", "paused_until", "failures", "last_error", "updated_at")
    fields = ("name", "paused_until", "failures", "last_error", "last_reply", "updated_at")
    ordering = ("name",)
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).using(database_alias())


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The suppression list, read-only: entries are written through mailqueue
    (``mailqueue suppress``, ``mailqueue.api.suppress``, the status page), which
    computes the key a recipient is compared by."""

    list_display = ("address", "reason", "scope_shown", "created_at", "note")
    list_filter = ("reason",)
    search_fields = ("address_key",)
    search_help_text = "An address, whole (the domain's case does not matter)."
    fields = ("address", "address_key", "reason", "scope_shown", "created_at", "note")
    readonly_fields = ("scope_shown",)
    ordering = ("-id",)
    sortable_by = ("created_at",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedPaginator
    list_per_page = 100

    @admin.display(description="scope")
    def scope_shown(self, obj: Suppression) -> str:
        return obj.scope or "everywhere"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).using(database_alias())

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """The address's key, exactly (served by the unique index), never a scan."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(address_key=api.suppression_key(term)), False
