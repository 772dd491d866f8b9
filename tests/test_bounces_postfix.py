"""Done means (issue #18): a real Postfix bounces, and the row ends ``bounced``.

A private Postfix instance (its own config, queue and log under the test's
tmp folder; Debian's ``postfix`` package, installed by the fixture on CI)
accepts a message from the worker's delivery code, is refused by its next
hop (the dev SMTP server: ``550 5.1.1``), and sends its own DSN to the
message's VERP return path, which its transport map routes to the
``mailqueue bounces serve`` endpoint. The recipient row must end
``bounced`` with Postfix's diagnostic, and the address be suppressed so the
next message to it is ``suppressed`` at claim.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import mailqueue
from mailqueue import api

from .conftest import BOUNCE_DOMAIN as DOMAIN
from .conftest import wait_until
from .system_packages import require_debian_packages
from .test_bounces_ingest import bounce_rows, recipient, send

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix-test.example
mydomain = postfix-test.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
transport_maps = texthash:{root}/etc/transport
smtp_dns_support_level = disabled
smtp_tls_security_level = none
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postfix:
    def __init__(self, root: Path, next_hop: int, bounces: int) -> None:
        self.root = root
        self.port = _free_port()
        etc = root / "etc"
        etc.mkdir(parents=True)
        (root / "spool").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")
        (etc / "main.cf").write_text(MAIN_CF.format(root=root))
        (etc / "transport").write_text(
            f"example.net smtp:[127.0.0.1]:{next_hop}\n{DOMAIN} smtp:[127.0.0.1]:{bounces}\n"
        )
        # Debian's master.cf, with smtpd on our port and nothing chrooted.
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1] not in ("#", " ", "\t", "") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"
                line = " ".join(fields)
            lines.append(line)
        (etc / "master.cf").write_text("\n".join(lines) + "\n")

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.root / "etc"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no maillog)"


@pytest.fixture
def postfix(smtp_server, endpoint) -> Iterator[Postfix]:
    require_debian_packages(["postfix"], ["/usr/sbin/postfix"], "Postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root (its daemons drop to 'postfix')")
    # Its daemons run as 'postfix': pytest's tmp folders (0700) are closed to them.
    root = Path(tempfile.mkdtemp(prefix="mq-postfix-"))
    root.chmod(0o755)
    instance = Postfix(root, smtp_server.port, endpoint.port)
    try:
        started = instance.postfix("start")
        if started.returncode != 0:
            pytest.fail(f"postfix did not start: {started.stderr}\n{instance.log()}")
        yield instance
    finally:
        instance.postfix("stop")
        shutil.rmtree(root, ignore_errors=True)


def test_a_real_postfix_dsn_turns_the_recipient_bounced_and_suppresses_it(
    verp, smtp_server, endpoint, postfix
):
    smtp_server.reject = ["nobody@*"]
    verp.reconfigure(relay_url=f"smtp://127.0.0.1:{postfix.port}")

    mid = send(verp, "nobody@example.net")
    assert recipient(verp, mid, "nobody@example.net")["status"] == "sent"  # Postfix said 250

    wait_until(
        lambda: recipient(verp, mid, "nobody@example.net")["status"] == "bounced",
        timeout=90,
        what="Postfix's DSN to reach mailqueue bounces serve\n" + postfix.log(),
    )
    got = recipient(verp, mid, "nobody@example.net")
    assert got["enhanced_code"] == "5.1.1"
    # Postfix's Diagnostic-Code quotes the next hop's reply.
    assert got["reply"].startswith("550 5.1.1 <nobody@example.net>")
    (row,) = bounce_rows(verp)
    assert (row.kind, row.effect, row.source) == ("dsn", "bounced", "smtp")
    assert b"Reporting-MTA: dns; mx.postfix-test.example" in row.raw
    history = [a.status for a in mailqueue.get_attempts(str(mid))]
    assert history == ["sent", "bounced"]
    assert mailqueue.get_status(str(mid)).status == "failed"  # its only recipient bounced

    (entry,) = api.suppressions(address="nobody@example.net")
    assert entry.reason == "bounced"
    again = send(verp, "nobody@example.net")
    assert recipient(verp, again, "nobody@example.net")["status"] == "suppressed"
