"""How the CLI and the demo show things on a terminal.

Everything printed here may come from outside (addresses, subjects, relay
replies), so it goes through :func:`shown`: no control character reaches the
terminal, and nothing is read as Rich markup.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

__all__ = ["cell", "cluster_limits", "fmt_time", "shown", "stats_table"]

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
    return table
