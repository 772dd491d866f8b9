"""The top header block: written by mailqueue, then read back as a receiver would.

Why not let the ``email`` package write it: when it folds a header it decodes
RFC 2047 encoded words and writes what they decode to, so on interpreters
without the CVE-2024-6923 fix (3.11 before 3.11.10, 3.12 before 3.12.5) the
subject ``=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?=`` becomes a real ``Bcc:``
line; and on every version it drops the quotes of a display name holding a
comma when it folds it (gh-80222), turning one address into two.

So the fields a caller gives are written here, in forms that cannot change
meaning when folded: addresses as ``name <spec>`` with the name an atom
phrase, a quoted string, or encoded words; text as itself or as encoded
words. Then :func:`check_block` reads the finished block back with a parser
that shares no code with the writer (the ``email`` package's parser for
anything beyond the plainest forms) and refuses the message unless it holds
exactly the fields and addresses that were composed. The same check guards
messages the ``email`` package serialized (``Message(eml=EmailMessage)``,
Django), whose address fields are rewritten here first.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import re
from collections.abc import Sequence
from email.headerregistry import Address
from typing import NamedTuple

from .errors import HeaderInjectionError, InvalidMessageError

__all__ = [
    "CONTROL",
    "Field",
    "address_field",
    "check_block",
    "read_block",
    "refuse_controls",
    "refuse_encoded_controls",
    "text_field",
]

# Characters that never belong in a header value: C0 controls but TAB, DEL, the C1
# controls (U+0085 is a line break to str.splitlines) and the Unicode line and
# paragraph separators.
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BYTES = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
# Loose on purpose: the email package decodes encoded words inside atoms and with
# whitespace inside them, so anything that starts like one is examined.
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([^?]*)\?(.*?)\?=", re.DOTALL)
HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable ASCII but ':'
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PHRASE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")
_PRINTABLE = re.compile(r"[ -~]*")
_Q_SAFE = re.compile(r"[A-Za-z0-9!*+\-/]")  # RFC 2047 5(3): may stand for itself in a phrase
# The plainest address lists, read without the email package: "a@b.c" or "Name <a@b.c>".
_SPEC = r"[^\s<>(),;:\"\\\[\]@]+@[^\s<>(),;:\"\\\[\]@]+"
_PLAIN_MAILBOX = rf"(?:({_ATEXT}(?: {_ATEXT})*) <({_SPEC})>|({_SPEC}))"
_PLAIN_LIST = re.compile(rf" ?{_PLAIN_MAILBOX}(?:, {_PLAIN_MAILBOX})*")
_PLAIN_ONE = re.compile(_PLAIN_MAILBOX)

_FOLD_AT = 78  # RFC 5322's recommended line length
_MAX_WORD = 900  # a longer word would risk the hard 998-character line limit
_EW_PREFIX, _EW_SUFFIX = "=?utf-8?q?", "?="
_EW_ROOM = 75 - len(_EW_PREFIX) - len(_EW_SUFFIX)  # RFC 2047: an encoded word <= 75


class Field(NamedTuple):
    """One header field as composed: its addresses, or its text."""

    name: str
    addresses: tuple[Address, ...] | None = None
    text: str = ""


# --------------------------------------------------------------------------- input


def refuse_controls(value: str, field: str) -> None:
    """Refuse control characters in ``value``, also those hidden in encoded words."""
    if CONTROL.search(value):
        raise HeaderInjectionError(
            "contains a line break, NUL or another control character; header injection is refused",
            field=field,
        )
    refuse_encoded_controls(value, field)


def refuse_encoded_controls(value: str, field: str) -> None:
    """Refuse encoded words in ``value`` that decode to a control character."""
    if "=?" in value:
        for match in _ENCODED_WORD.finditer(value):
            if _decodes_to_control(*match.groups()):
                raise HeaderInjectionError(
                    f"the encoded word {match.group(0)[:60]!r} decodes to a line break or "
                    "another control character; header injection is refused",
                    field=field,
                )


def _decodes_to_control(charset: str, encoding: str, text: str) -> bool:
    """Whether an encoded word, decoded as leniently as mail readers do, holds a control."""
    raw = text.encode("ascii", "surrogateescape") if text.isascii() else text.encode()
    if encoding.lower() == "q":
        data = re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes.fromhex(m.group(1).decode()), raw)
        data = data.replace(b"_", b" ")
    elif encoding.lower() == "b":
        try:
            data = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", raw) + b"===")
        except (binascii.Error, ValueError):
            data = raw
    else:
        return False  # not an encoded word to anyone
    if _CONTROL_BYTES.search(data):
        return True
    try:
        codecs.lookup(charset.partition("*")[0])
    except (LookupError, ValueError):
        return False  # readers show the bytes as they are: checked above
    return bool(CONTROL.search(data.decode(charset.partition("*")[0], "replace")))


# --------------------------------------------------------------------------- writing


def _encoded_words(text: str, first_room: int = _EW_ROOM) -> list[str]:
    """``text`` as RFC 2047 Q encoded words of whole characters, safe in a phrase too.

    ``first_room`` shortens the first word, which shares its line with the field name.
    """
    words: list[str] = []
    current: list[str] = []
    room = max(first_room, 12)
    for char in text:
        if char == " ":
            piece = "_"
        elif _Q_SAFE.match(char):
            piece = char
        else:
            piece = "".join(f"={b:02X}" for b in char.encode("utf-8"))
        if len(piece) > room and current:
            words.append(_EW_PREFIX + "".join(current) + _EW_SUFFIX)
            current, room = [], _EW_ROOM
        current.append(piece)
        room -= len(piece)
    if current or not words:
        words.append(_EW_PREFIX + "".join(current) + _EW_SUFFIX)
    return words


def _phrase_tokens(name: str, first_room: int = _EW_ROOM, *, whole: bool = False) -> list[str]:
    """A display name as tokens joined by spaces, each fold between them harmless.

    A name that needs encoding keeps its atoms as they are (the modern ``email``
    policies' way), or with ``whole`` is encoded as one text (``compat32``'s way,
    what Django 5.2's SMTP backend sends)."""
    if _PHRASE.fullmatch(name) and "=?" not in name:
        return name.split(" ")
    words = name.split(" ")
    # (Readers decode encoded words even inside quotes: a name holding "=?" is encoded.)
    if _PRINTABLE.fullmatch(name) and "=?" not in name and max(map(len, words)) <= _FOLD_AT - 10:
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        # Folding inside a quoted string only ever replaces a space by CRLF+space.
        return quoted.split(" ")
    return _encoded_words(name, first_room) if whole else _mixed_phrase_tokens(name, first_room)


def _mixed_phrase_tokens(name: str, first_room: int = _EW_ROOM) -> list[str]:
    """Words that are atoms as they are, each run of the others as encoded words.

    ``Firstname Sürname`` becomes ``Firstname =?utf-8?q?S=C3=BCrname?=``, as the
    email package writes it (and Django's SMTP backend sends it). A run of words
    that need encoding is one encoded text with its spaces inside (``_``), since
    readers drop the space between two encoded words. Any other spacing (double,
    leading, trailing) is encoded whole, so that it survives as written.
    """
    words = name.split(" ")
    if "" in words:
        return _encoded_words(name, first_room)
    tokens: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            tokens.extend(_encoded_words(" ".join(run), first_room if not tokens else _EW_ROOM))
            run.clear()

    for word in words:
        if _PHRASE.fullmatch(word) and "=?" not in word:
            flush()
            tokens.append(word)
        else:
            run.append(word)
    flush()
    return tokens


def _mailbox_tokens(
    address: Address, first_room: int = _EW_ROOM, *, whole: bool = False
) -> list[str]:
    spec = address.addr_spec
    if not address.display_name:
        return [spec]
    return [*_phrase_tokens(address.display_name, first_room, whole=whole), f"<{spec}>"]


def _fold(name: str, tokens: Sequence[str]) -> str:
    """``Name: t1 t2 …`` with a fold before a token where the line would pass 78."""
    line = f"{name}: " + " ".join(tokens)
    if len(line) <= _FOLD_AT:
        return line  # the common short field: nothing to fold
    line = f"{name}:"
    lines: list[str] = []
    started = False
    for token in tokens:
        if started and token and len(line) + 1 + len(token) > _FOLD_AT:
            lines.append(line)
            line = " " + token
        else:
            line = f"{line} {token}"
        started = started or bool(token)
    lines.append(line)
    return "\r\n".join(lines)


def address_field(name: str, addresses: Sequence[Address], *, whole_names: bool = False) -> str:
    """An address list field, folded only between tokens (never inside one).

    ``whole_names``: a display name that needs encoding is one encoded text, as the
    ``email`` package's ``compat32`` policy writes it (see ``_phrase_tokens``)."""
    tokens: list[str] = []
    for index, address in enumerate(addresses):
        room = _first_room(name) if index == 0 else _EW_ROOM
        mailbox = _mailbox_tokens(address, room, whole=whole_names)
        if index < len(addresses) - 1:
            mailbox[-1] += ","
        tokens.extend(mailbox)
    return _fold(name, tokens)


def text_field(name: str, value: str) -> str:
    """An unstructured field: printable ASCII as it is, anything else as encoded words."""
    words = value.split(" ")
    if _PRINTABLE.fullmatch(value) and max(len(w) for w in words) <= _MAX_WORD:
        return _fold(name, words)
    return _fold(name, _encoded_words(value, _first_room(name)))


def _first_room(name: str) -> int:
    """Room for the encoded text of a first word that follows ``Name: `` on its line."""
    return _FOLD_AT - len(name) - 2 - len(_EW_PREFIX) - len(_EW_SUFFIX)


# --------------------------------------------------------------------------- reading back


def read_block(head: str) -> list[tuple[str, str]]:
    """The fields of a header block (CRLF lines, no final blank line), unfolded."""
    pairs = head.count("\r\n")
    if head.count("\r") != pairs or head.count("\n") != pairs or "\0" in head:
        raise _changed("a bare CR, LF or NUL in the header block")
    fields: list[list[str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            if not fields or not line.strip():
                raise _changed("a continuation line where none can be")
            fields[-1][1] += line
            continue
        name, colon, value = line.partition(":")
        if not colon or not HEADER_NAME.fullmatch(name):
            raise _changed(f"a line that is not a header field: {line[:60]!r}")
        fields.append([name, value])
    return [(name, value) for name, value in fields]


def _changed(what: str) -> InvalidMessageError:
    return HeaderInjectionError(
        f"the composed header block does not say what was given ({what}); the message "
        "was refused rather than sent with a header or recipient nobody named",
        field="headers",
    )


def _read_addresses(name: str, value: str) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address field, as a receiver reads them."""
    if "=?" not in value and _PLAIN_LIST.fullmatch(value):
        out = []
        for match in _PLAIN_ONE.finditer(value):
            display, named, bare = match.groups()
            out.append((display or "", named or bare))
        return out
    header = email.policy.default.header_factory(name, value.strip())
    if any(group.display_name is not None for group in header.groups):
        raise _changed(f"{name} holds a group")
    return [(a.display_name, a.addr_spec) for a in header.addresses]


def _same_name(a: str, b: str) -> bool:
    # Whitespace aside: readers differ on the space between two encoded words.
    return "".join(a.split()) == "".join(b.split())


def check_block(
    head: str, composed: Sequence[Field], *, then: Sequence[str] = (), max_bytes: int | None = None
) -> None:
    """Refuse ``head`` unless it holds exactly ``composed`` and then the fields ``then``.

    Names, count and order must match; each address field must read back as the
    same (display name, address) pairs; no encoded word may decode to a control.
    """
    if max_bytes is not None and len(head.encode()) > max_bytes:
        raise InvalidMessageError(
            f"the header block is {len(head.encode())} bytes, over the {max_bytes}-byte "
            "limit (MAILQUEUE_MAX_HEADER_BLOCK)",
            field="headers",
        )
    fields = read_block(head)
    expected = [f.name.lower() for f in composed] + [n.lower() for n in then]
    written = [name.lower() for name, _ in fields]
    if written != expected:
        extra = [n for n in written if n not in expected] or written
        raise _changed(
            f"fields {', '.join(extra[:5])} where {', '.join(expected[:5])}… was composed"
        )
    encoded_words = "=?" in head
    for (name, value), field in zip(fields, composed, strict=False):
        if encoded_words:
            refuse_encoded_controls(value, field.name)
        if field.addresses is None:
            continue
        read = _read_addresses(name, value)
        want = [(a.display_name, a.addr_spec) for a in field.addresses]
        if len(read) != len(want) or any(
            r_spec.lower() != w_spec.lower()
            or (r_name != w_name and not _same_name(r_name, w_name))
            for (r_name, r_spec), (w_name, w_spec) in zip(read, want, strict=True)
        ):
            raise _changed(
                f"{name} reads back as {len(read)} address(es), not the {len(want)} given"
            )


def read_one_mailbox(value: str) -> tuple[str, str] | None:
    """``value`` as one plain mailbox without the email package, or None."""
    match = _PLAIN_ONE.fullmatch(value) if "=?" not in value else None
    if match is None:
        return None
    display, named, bare = match.groups()
    return display or "", named or bare
