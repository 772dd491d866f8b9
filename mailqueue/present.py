"""How the CLI and the demo show things on a terminal.

Everything printed here may come from outside (addresses, subjects, relay
replies), so it goes through :func:`shown`: no control character reaches the
terminal, and nothing is read as Rich markup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

__all__ = [
    "cell",
    "cluster_limits",
    "fmt_time",
    "messages_table",
    "print_status",
    "relays_table",
    "shown",
    "stats_table",
    "stats_watch_view",
]

# C0 controls (ESC, CR, LF, BEL, BS…), DEL, C1 controls (CSI, OSC as one byte),
# the Unicode line and paragraph separators and the bidi overrides that reorder
# what a terminal displays.
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_CONTROLS.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def shown(value: object, *, newlines: bool = False) -> str:
    """``value`` as text that cannot steer the terminal it is printed on.

    Control characters are written as escapes (``\\x1b``, ``\\r``, ``\\u202e``),
    line feeds too unless ``newlines`` (a table cell may hold several lines; a
    line of plain output may not). Rich markup is not touched: print the result
    as ``Text`` or with ``click.echo``, never through markup.
    """
    text = "" if value is None else str(value)
    if newlines:
        return "\n".join(_TERMINAL_CONTROLS.sub(_escape_control, line) for line in text.split("\n"))
    return _TERMINAL_CONTROLS.sub(_escape_control, text)


def cell(value: object, style: str = "", *, newlines: bool = False) -> Text:
    """A table cell or line from outside data: no markup, no emoji codes, no controls."""
    from rich.text import Text

    return Text(shown(value, newlines=newlines), style=style)


def fmt_time(value: Any) -> str:
    """A timestamp to the second, or ``-`` when there is none."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cluster_limits(relay: dict[str, Any]) -> str:
    """``3 connections, 200 msg/s`` (shared by all workers through Redis), or ``-``."""
    parts = []
    if relay.get("cluster_max_connections"):
        parts.append(f"{relay['cluster_max_connections']} connections")
    if relay.get("rate_limit"):
        parts.append(f"{relay['rate_limit']:g} msg/s")
    return ", ".join(parts) or "-"


def stats_table(data: dict[str, Any]) -> Any:
    """Message and recipient counts side by side (``mailqueue stats``, the demo)."""
    from rich.table import Table

    table = Table("messages", "count", "recipients", "count")
    m, r = list(data["messages"].items()), list(data["recipients"].items())
    for i in range(max(len(m), len(r))):
        left = m[i] if i < len(m) else ("", "")
        right = r[i] if i < len(r) else ("", "")
        table.add_row(cell(left[0]), str(left[1]), cell(right[0]), str(right[1]))
    listed = data.get("suppressions")
    if listed is not None:
        parts = ", ".join(f"{reason} {n}" for reason, n in listed.items() if n)
        table.caption = f"suppression list: {sum(listed.values())}" + (
            f" ({parts})" if parts else ""
        )
    return table


def stats_watch_view(data: dict[str, Any], depth: Iterable[Any], interval: float) -> Any:
    """One frame of ``mailqueue stats --watch``: the time, the counts, each relay's queue."""
    import time

    from rich.console import Group
    from rich.text import Text

    lines = [
        f"relay {shown(d.relay)}: {d.waiting} waiting, {d.due} due, oldest due "
        f"{d.oldest_due_age_s:.0f}s"
        for d in depth
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return Group(
        Text(f"{stamp}  (every {interval:g}s, Ctrl-C to stop)"),
        stats_table(data),
        Text("\n".join(lines) or "queue empty"),
    )


def print_status(console: Any, info: Any, attempts: Sequence[Any] | None) -> None:
    """``mailqueue status``: the message, its recipients, and every attempt if given."""
    from rich.table import Table

    line = cell(info.id, "bold")
    line.append(f"  {shown(info.status)}  attempts={info.attempts}  relay={shown(info.relay)}")
    console.print(line)
    console.print(cell(f"from {info.mail_from}  subject {info.subject!r}  {info.size} bytes"))
    console.print(
        f"created {fmt_time(info.created_at)}  next attempt {fmt_time(info.next_attempt_at)}"
        f"  expires {fmt_time(info.expires_at)}",
        markup=False,
    )
    table = Table("recipient", "kind", "status", "attempts", "code", "reply")
    for r in info.recipients:
        table.add_row(
            cell(r.address),
            cell(r.kind),
            cell(r.status),
            str(r.attempts),
            cell(" ".join(x for x in (str(r.smtp_code or ""), r.enhanced_code or "") if x)),
            cell(r.reply, newlines=True),
        )
    console.print(table)
    if attempts is not None:
        log = Table("when", "recipient", "result", "code", "reply", "worker", title="every attempt")
        for a in attempts:
            log.add_row(
                fmt_time(a.at),
                cell(a.address),
                cell(a.status),
                cell(" ".join(x for x in (str(a.smtp_code or ""), a.enhanced_code or "") if x)),
                cell(a.reply, newlines=True),
                cell(a.worker),
            )
        console.print(log)


def messages_table(rows: Iterable[Any]) -> Any:
    """``mailqueue list``: one row per message, its id always in full.

    The id column never wraps or shrinks (an id is what the operator copies
    into ``status``, ``retry`` or ``cancel``); on a narrow terminal the other
    columns fold instead, and the borders are left out to give them room.
    """
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True)
    table.add_column("created")
    for name in ("from", "subject"):
        table.add_column(name, overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("last error", overflow="fold")
    for r in rows:
        table.add_row(
            cell(r.id),
            cell(r.status),
            fmt_time(r.created_at),
            cell(r.mail_from),
            cell(r.subject[:40]),
            str(r.attempts),
            cell(r.last_error),
        )
    return table


def relays_table(rows: Iterable[dict[str, Any]]) -> Any:
    """``mailqueue relays``: each relay (never its secrets) and its pause."""
    from rich.table import Table

    table = Table("relay", "url", "starttls", "verify", "auth", "pool", "cluster limits", "state")
    for r in rows:
        state = cell("ok")
        if r["paused"]:
            state = cell(f"PAUSED until {r['paused_until']}", "red")
            state.append("\n" + shown(f"{r['last_error']}: {r['last_reply']}", newlines=True))
        table.add_row(
            cell(r["name"]),
            cell(r["url"]),
            cell(r["starttls"]),
            cell("yes")
            if r["tls_verify"] and r["tls_check_hostname"]
            else cell("relaxed", "yellow"),
            cell(r["auth"] or "-"),
            str(r["pool_size"]),
            cluster_limits(r),
            state,
        )
    return table
