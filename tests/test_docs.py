"""The documentation's code runs as written (issue #19).

Every fenced ```python block of README.md and docs/*.md is executed here, in a
fresh folder, against a fresh SQLite stack relaying to the dev SMTP server;
whatever it queued is then delivered with the worker's own code and must reach
that server. A block runs in the context named by a comment on the line before
its fence:

* none: plain Python, mailqueue configured on the stack;
* ``<!-- context: django -->``: inside the test Django project
  (``tests/django_project``, its ``EMAIL_BACKEND`` is mailqueue's), mailqueue
  on the project's own SQLite database;
* ``<!-- context: flask -->``: with the stack's ``MAILQUEUE_*`` settings in the
  environment and ``DATABASE_URL`` naming the same database;
* ``<!-- not-run: reason -->``: a fragment that cannot run alone (a
  ``settings.py``): it must at least compile.

Shell blocks and inline code name commands: every ``mailqueue <command>``
must exist (``--help`` exits 0), and every ``make <target>`` must be a target
of the Makefile.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue.config import configure, settings_from_env
from mailqueue.devserver import DevServer
from tests.conftest import Stack, _base_settings
from tests.contrib_helpers import all_ids, deliver
from tests.test_django import django_env  # noqa: F401 (a fixture: the test Django project)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAILQUEUE = str(Path(sys.executable).with_name("mailqueue"))

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|context):\s*(.*?)\s*-->\s*$")
CONTEXTS = {"django", "flask"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None  # "not-run" or "context"
    value: str  # the reason, or the context's name

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = lines[i - 1] if i else ""
        mark = MARKER.match(previous)
        blocks.append(
            Block(
                page=str(path.relative_to(ROOT)),
                line=i + 1,
                lang=start.group(1),
                code="\n".join(lines[i + 1 : end]) + "\n",
                marker=mark.group(1) if mark else None,
                value=mark.group(2) if mark else "",
            )
        )
        i = end + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in _blocks(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]


def test_the_pages_have_python_to_run_and_every_marker_is_understood():
    assert {b.page for b in PYTHON_BLOCKS} >= {"README.md", "docs/python.md", "docs/flask.md"}
    for block in ALL_BLOCKS:
        if block.marker is None:
            continue
        assert block.lang == "python", f"{block}: markers are for python blocks"
        if block.marker == "not-run":
            assert block.value, f"{block}: say why it cannot run"
        else:
            assert block.value in CONTEXTS, f"{block}: unknown context {block.value!r}"
    # A marker that is not right above a fence would be silently ignored.
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if MARKER.match(line):
                assert n + 1 < len(lines) and lines[n + 1].startswith("```python"), (
                    f"{page.relative_to(ROOT)}:{n + 1}: a marker must sit right above ```python"
                )


@pytest.fixture
def django_stack(request, tmp_path, smtp_server: DevServer) -> Iterator[Stack]:
    """mailqueue on the test Django project's SQLite database, relaying to the dev server."""
    env = request.getfixturevalue("django_env")
    settings = configure(
        _base_settings(
            env.sqlite_url,
            f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            smtp_server.url,
            f"mq-test-{uuid.uuid4().hex[:8]}",
        )
    )
    stack = Stack("sqlite", settings)
    with stack.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM mq_recipient"))
        conn.execute(sa.text("DELETE FROM mq_message"))
    try:
        yield stack
    finally:
        mailqueue._reset_caches()
        configure(settings_from_env({}))


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b.marker == "not-run"], ids=str)
def test_a_fragment_that_cannot_run_alone_compiles(block: Block):
    compile(block.code, str(block), "exec")


@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b.marker != "not-run"], ids=str)
def test_a_python_snippet_runs_as_written_and_its_mail_arrives(
    block: Block, request, tmp_path, monkeypatch, smtp_server: DevServer
):
    monkeypatch.chdir(tmp_path)
    if block.value == "django":
        stack: Stack = request.getfixturevalue("django_stack")
    else:
        stack = request.getfixturevalue("sqlite_stack")
    if block.value == "flask":
        s = stack.settings
        monkeypatch.setenv("MAILQUEUE_DATABASE_URL", s.database_url)
        monkeypatch.setenv("MAILQUEUE_BROKER_URL", s.broker_url)
        monkeypatch.setenv("MAILQUEUE_RELAY_URL", s.relay.url)
        monkeypatch.setenv("MAILQUEUE_QUEUE", s.queue_name)
        monkeypatch.setenv("DATABASE_URL", s.database_url)

    # As if pasted into a module of its own (SQLAlchemy resolves a model's
    # annotations in its module, found in sys.modules).
    module = types.ModuleType(f"docs_snippet_{uuid.uuid4().hex[:8]}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block.code, str(block), "exec"), module.__dict__)  # noqa: S102 (the documentation)

    from mailqueue.worker.app import flush_dispatch

    flush_dispatch()
    ids = all_ids(stack)
    if not ids:
        return  # a snippet that defines something or talks to its own server
    deliver(stack, ids)
    statuses = {mailqueue.get_status(i).status for i in ids}
    assert statuses <= {"sent", "cancelled"}, f"{block}: {statuses}"
    assert smtp_server.messages, f"{block}: nothing reached the SMTP server"
    recipients = [r for i in ids for r in mailqueue.get_status(i).recipients]
    sent = [r.address for r in recipients if r.status == "sent"]
    received = [a for m in smtp_server.messages for a in m.rcpt_tos]
    assert sorted(received) == sorted(sent)


# --------------------------------------------------------------------------- commands
COMMAND = re.compile(r"(?:^|[\s;|&(`$])mailqueue((?:[ \t]+--?[\w-]+)*)[ \t]+([a-z][a-z-]*)\b")
MAKE = re.compile(r"(?:^|[\s;|&(`])make[ \t]+([a-z][\w-]*)\b")
INLINE = re.compile(r"`([^`\n]+)`")


def _command_text() -> str:
    """Shell blocks and inline code of every page (where commands are named)."""
    parts = [b.code for b in ALL_BLOCKS if b.lang in ("sh", "bash", "console", "")]
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        parts += INLINE.findall(text)
    return "\n".join(parts)


def _named(pattern: re.Pattern[str], group: int) -> set[str]:
    return {m.group(group) for m in pattern.finditer(_command_text())}


def test_the_pages_name_commands_that_the_check_covers():
    assert {"worker", "scheduler", "devserver", "migrate", "send", "web"} <= _named(COMMAND, 2)
    assert {"demo", "test", "lint", "docs"} <= _named(MAKE, 1)


@pytest.mark.parametrize("command", sorted(_named(COMMAND, 2)))
def test_every_mailqueue_command_the_docs_name_exists(command: str):
    done = subprocess.run(
        [MAILQUEUE, command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"`mailqueue {command}` is named in the docs: {done.stderr}"
    assert "Usage:" in done.stdout


def test_every_make_target_the_docs_name_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    missing = _named(MAKE, 1) - targets
    assert not missing, f"named in the docs, not in the Makefile: {sorted(missing)}"


# --------------------------------------------------------------------------- links
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", ["README.md", "ops/bench/README.md"])
def test_every_relative_link_outside_the_site_points_at_a_file(page: str):
    """docs/ is checked by `mkdocs build --strict` (make lint); these two pages are not in it."""
    path = ROOT / page
    broken = []
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page}: {broken}"
