"""What DKIM signing costs the worker, per message: signing alone, no SMTP, no SQL.

It composes one typical message (text + HTML, about ``--size-kb`` KB, the way
``enqueue`` does), then calls the worker's signer (``smtp/dkim.py``, the very
function the worker calls before DATA) on it over and over, for each variant,
interleaved over ``--rounds`` rounds so that drift on a shared machine hits
every variant alike:

* ``unsigned``: no DKIM configured (the worker skips signing: the copy it
  makes of the content is all that is left);
* ``no key for domain``: DKIM configured, the From domain has no key (the
  header scan and lookup every unsigned message pays);
* ``rsa-sha256``: one RSA 2048 signature;
* ``ed25519-sha256``: one Ed25519 signature alone (dkimpy directly, with the
  signer's options; mailqueue always signs with RSA too);
* ``rsa + ed25519``: both signatures, what a domain with both keys gets;
* ``rsa, dkimpy's RSA``: one RSA signature made by dkimpy alone (its RSA is
  Python integers; mailqueue has OpenSSL make it, the ``rsa-sha256`` row).

Figures: messages/s of one core and CPU µs per message (median of the rounds).
Example::

    .venv/bin/python ops/bench/dkim_cost.py --messages 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailqueue import Message
from mailqueue.config import settings_from_env
from mailqueue.message import build_envelope
from mailqueue.smtp.dkim import SIGNED_HEADERS, DkimSigner, load_signer


def _message(size_kb: int) -> bytes:
    paragraph = (
        "Dear reader, this week's news: prices, events and a few words from the team. "
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit. \n"
    )
    repeat = max(1, (size_kb * 1024 - 1500) // (len(paragraph) * 2 + 7))  # text + <p>html</p>
    text = paragraph * repeat
    html = "<html><body>" + "".join(f"<p>{paragraph}</p>" for _ in range(repeat)) + "</body></html>"
    envelope = build_envelope(
        Message(
            sender=("Example News", "news@example.com"),
            to=["reader@example.org"],
            subject="This week at Example: news, offers and events",
            text=text,
            html=html,
            headers={
                "List-Unsubscribe": "<https://example.com/u/abc>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )
    )
    return envelope.data


def make_keys() -> tuple[str, str]:
    """An RSA-2048 PEM and an Ed25519 seed (base64), new for each run."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    seed = base64.b64encode(bytes(nacl.signing.SigningKey.generate())).decode("ascii")
    return pem, seed


def _signer(env: dict[str, str]) -> DkimSigner:
    signer = load_signer(settings_from_env(env))
    assert signer is not None
    return signer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="signatures per variant/round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-kb", type=int, default=10, help="size of the typical message")
    args = parser.parse_args()

    data = _message(args.size_kb)
    pem, seed = make_keys()
    base = {
        "MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR": "s2026",
        "MAILQUEUE_DKIM__EXAMPLE_COM__KEY": pem,
    }
    rsa_only = _signer(base)
    both = _signer(
        {
            **base,
            "MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_SELECTOR": "e2026",
            "MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_KEY": seed,
        }
    )
    other = _signer({k.replace("EXAMPLE_COM", "OTHER_EXAMPLE"): v for k, v in base.items()})
    # The headers the signer signs (h= of its own signature), for the Ed25519-alone row.
    signed = dkim.DKIM(rsa_only.sign(data).data)
    tags = dkim.util.parse_tag_value(signed.headers[0][1])
    include = [h.strip() for h in tags[b"h"].split(b":")]
    assert set(include) <= set(SIGNED_HEADERS)

    def ed25519_alone(content: bytes) -> bytes:
        raw = bytes(content)
        signature = dkim.DKIM(raw, linesep=b"\r\n").sign(
            b"e2026",
            b"example.com",
            seed.encode("ascii"),
            signature_algorithm=b"ed25519-sha256",
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return signature + raw

    def rsa_pure_python(content: bytes) -> bytes:
        raw = bytes(content)
        signature = dkim.DKIM(raw, linesep=b"\r\n").sign(
            b"s2026",
            b"example.com",
            pem.encode("ascii"),
            signature_algorithm=b"rsa-sha256",
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return signature + raw

    variants: dict[str, Callable[[bytes], object]] = {
        "unsigned": bytes,
        "no key for domain": other.sign,
        "rsa-sha256": rsa_only.sign,
        "ed25519-sha256": ed25519_alone,
        "rsa + ed25519": both.sign,
        "rsa, dkimpy's RSA": rsa_pure_python,
    }
    # Each variant does what it says (not timed).
    assert both.sign(data).algorithms == ("rsa-sha256", "ed25519-sha256")
    assert rsa_only.sign(data).algorithms == ("rsa-sha256",)
    assert other.sign(data).algorithms == ()

    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, sign in variants.items():
            started = time.process_time()
            for _ in range(args.messages):
                sign(data)
            cpu[name].append((time.process_time() - started) / args.messages)

    print(
        f"DKIM signing cost: a {len(data) / 1024:.1f} KB message (text + HTML), "
        f"{args.messages} signatures x {args.rounds} rounds, one process, "
        f"Python {sys.version.split()[0]}, dkimpy {version('dkimpy')}"
    )
    print(f"{'variant':<20} {'msg/s (1 core)':>15} {'CPU µs/msg':>12} {'vs unsigned':>12}")
    unsigned = statistics.median(cpu["unsigned"])
    for name, per in cpu.items():
        median = statistics.median(per)
        extra = "" if name == "unsigned" else f"+{(median - unsigned) * 1e6:,.0f} µs"
        print(f"{name:<20} {1 / median:>15,.0f} {median * 1e6:>12,.1f} {extra:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
