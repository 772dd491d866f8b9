"""DKIM signatures (RFC 6376), added by the worker to the exact bytes it sends.

The keys live only where workers run (``MAILQUEUE_DKIM__<DOMAIN>__<OPTION>``,
see ``config.DkimKey``): they are read once, when the worker starts
(:func:`load_signer`, a :class:`ConfigError` for a key that cannot be read),
and never written to a row, a task payload, a log line or a ``repr``.

What a signature covers:

- the message as it goes on the wire: line endings are made CRLF first (the
  SMTP client would do it anyway, after the signature), and dot-stuffing is
  the transport's, undone by the receiver before it verifies;
- rsa-sha256, and ed25519-sha256 as a second signature when the domain has an
  Ed25519 key (RFC 8463: receivers that do not know it ignore it);
- relaxed/relaxed canonicalization: it survives the refolding and trailing
  whitespace changes relays commonly make;
- the headers of :data:`SIGNED_HEADERS` that the message has (each
  occurrence), and From once more than it has ("oversigning": a From added
  on the way breaks the signature).

The signing domain (``d=``) is the domain of the header From, the one DMARC
aligns with. A message whose From domain has no key goes unsigned.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

from ..config import DkimKey, Settings
from ..errors import ConfigError

__all__ = ["SIGNED_HEADERS", "DkimSigner", "SignedMessage", "from_domain", "load_signer"]

log = logging.getLogger("mailqueue.dkim")

SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"reply-to",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
"""Header fields signed when present (RFC 6376 §5.4.1, plus List-Id and RFC 8058's pair,
which the worker adds to list messages before it signs them)."""

_HEADER_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:", re.MULTILINE)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_FROM = re.compile(rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class _Keys:
    """One domain's keys, read and checked. Its repr shows no key."""

    domain: bytes
    selector: bytes
    rsa_pem: bytes = field(repr=False)
    rsa: Any = field(repr=False)  # the same key for OpenSSL (cryptography)
    ed25519_selector: bytes | None = None
    ed25519_seed: bytes | None = field(default=None, repr=False)  # base64, dkimpy's form


@dataclass(frozen=True)
class SignedMessage:
    """What :meth:`DkimSigner.sign` did: the bytes to send and who signed them."""

    data: bytes
    domain: str | None
    """The From domain (``None``: no From address could be read)."""
    algorithms: tuple[str, ...] = ()
    """``("rsa-sha256", "ed25519-sha256")``, ``("rsa-sha256",)``, or () when unsigned."""


def from_domain(header_block: bytes) -> str | None:
    """The domain of the first address in the header From (lowercase), or ``None``."""
    match = _FROM.search(header_block)
    if match is None:
        return None
    value = match.group(1).decode("utf-8", "replace").replace("\r\n", "")
    for _, address in getaddresses([value]):
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            domain = domain.strip().rstrip(".").lower()
            try:
                return domain.encode("idna").decode("ascii")
            except UnicodeError:
                return domain
    return None


class DkimSigner:
    """Signs messages with the keys of their From domain (one per worker process)."""

    def __init__(self, keys: Mapping[str, _Keys]) -> None:
        import dkim  # an extra: checked by load_signer

        self._dkim = dkim
        self._keys = dict(keys)

    @property
    def domains(self) -> list[str]:
        return sorted(self._keys)

    def sign(self, data: bytes | bytearray) -> SignedMessage:
        """``data`` with its DKIM-Signature header(s) on top, or as it was (CRLF) if
        its From domain has no key. Raises what dkimpy raises for a message it
        cannot parse (the caller sends it unsigned)."""
        raw = bytes(data)
        if raw.count(b"\n") != raw.count(b"\r\n"):  # a bare LF (C speed to find none)
            raw = _BARE_LF.sub(b"\r\n", raw)
        end = raw.find(b"\r\n\r\n")
        header_block = raw if end < 0 else raw[: end + 2]
        domain = from_domain(header_block)
        keys = self._keys.get(domain) if domain else None
        if keys is None:
            return SignedMessage(raw, domain)
        present = [m.group(1).lower() for m in _HEADER_NAME.finditer(header_block)]
        include = [name for name in SIGNED_HEADERS for _ in range(present.count(name))]
        include.append(b"from")  # oversigned: an added From breaks the signature
        signer = _dkim_class(self._dkim)(raw, linesep=b"\r\n")
        relaxed = (b"relaxed", b"relaxed")
        signatures = []
        algorithms = ["rsa-sha256"]
        if keys.ed25519_selector is not None and keys.ed25519_seed is not None:
            # The Ed25519 one ends up below the RSA one: a receiver reads from the top.
            signatures.append(
                signer.sign(
                    keys.ed25519_selector,
                    keys.domain,
                    keys.ed25519_seed,
                    signature_algorithm=b"ed25519-sha256",
                    canonicalize=relaxed,
                    include_headers=include,
                )
            )
            algorithms.append("ed25519-sha256")
        signer.openssl_rsa = keys.rsa
        signatures.insert(
            0,
            signer.sign(
                keys.selector,
                keys.domain,
                keys.rsa_pem,
                signature_algorithm=b"rsa-sha256",
                canonicalize=relaxed,
                include_headers=include,
            ),
        )
        return SignedMessage(b"".join(signatures) + raw, domain, tuple(algorithms))


class _OpenSSLSignature:
    """Quacks like PyNaCl's signed message: ``.signature`` is the RSA signature."""

    def __init__(self, rsa_key: Any, digest: bytes) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        self.signature = rsa_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


class _OpenSSLKey:
    def __init__(self, rsa_key: Any) -> None:
        self._rsa_key = rsa_key

    def sign(self, digest: bytes) -> _OpenSSLSignature:
        return _OpenSSLSignature(self._rsa_key, digest)


_DKIM_CLASS: Any = None


def _dkim_class(dkim: Any) -> Any:
    """dkimpy's ``DKIM`` with its RSA signature made by OpenSSL, not pure Python.

    dkimpy computes RSA with Python integers: ~7 ms per signature on a 2048-bit
    key here, ~25 times OpenSSL's (ops/bench/dkim_cost.py). PKCS #1 v1.5 is
    deterministic, so the bytes are the ones dkimpy would write. dkimpy builds
    the header and the hash as always; only the last step, signing the SHA-256
    digest, goes through the branch dkimpy uses for Ed25519 (``pk.sign(digest)
    .signature``), handed an object that signs with RSA. The header's ``a=``
    was written before (``rsa-sha256``); the hash is SHA-256 in both branches.
    The tests verify every signature with dkimpy's own verifier.
    """
    global _DKIM_CLASS
    if _DKIM_CLASS is None:

        class OpenSSLDKIM(dkim.DKIM):  # type: ignore[misc,name-defined]
            openssl_rsa: Any = None
            signature_algorithm: bytes

            def gen_header(
                self, fields, include_headers, canon_policy, header_name, pk, standardize=False
            ):  # type: ignore[no-untyped-def]
                if self.openssl_rsa is None or self.signature_algorithm != b"rsa-sha256":
                    return super().gen_header(
                        fields, include_headers, canon_policy, header_name, pk, standardize
                    )
                self.signature_algorithm = b"ed25519-sha256"  # the branch that calls pk.sign
                try:
                    return super().gen_header(
                        fields,
                        include_headers,
                        canon_policy,
                        header_name,
                        _OpenSSLKey(self.openssl_rsa),
                        standardize,
                    )
                finally:
                    self.signature_algorithm = b"rsa-sha256"

        _DKIM_CLASS = OpenSSLDKIM
    return _DKIM_CLASS


def load_signer(settings: Settings) -> DkimSigner | None:
    """Read and check every configured DKIM key; ``None`` when none is configured.

    Raises :class:`ConfigError` (one line, naming the setting, never the key)
    for a key file that cannot be read, a key that is not a private key of
    its kind, an RSA key shorter than 1024 bits, or dkimpy not installed.
    """
    if not settings.dkim:
        return None
    try:
        import cryptography  # noqa: F401
        import dkim  # noqa: F401
        import nacl.signing  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError(
            "DKIM keys are configured (MAILQUEUE_DKIM__*) but dkimpy is not installed: "
            "pip install 'mailqueue[dkim]'",
            name="MAILQUEUE_DKIM__",
        ) from None
    keys = {domain: _load(entry) for domain, entry in settings.dkim.items()}
    return DkimSigner(keys)


def _read_key(entry: DkimKey, option: str, path: str | None, text: str | None) -> bytes:
    where = f"{entry.env_prefix}{option}"
    if path is not None:
        try:
            with open(path, "rb") as fh:
                return fh.read().strip().replace(b"\r\n", b"\n")
        except OSError as exc:
            raise ConfigError(
                f"DKIM key for {entry.domain}: cannot read {where}={path} ({exc.strerror}); "
                "fix the path or the file's owner (the worker's user must read it)",
                name=where,
            ) from None
    assert text is not None
    # An environment variable often holds the PEM with "\n" written out.
    return text.strip().replace("\\n", "\n").replace("\r\n", "\n").encode("ascii", "replace")


def _load(entry: DkimKey) -> _Keys:
    from dkim.crypto import parse_pem_private_key
    from nacl.signing import SigningKey

    option = "KEY_FILE" if entry.key_file else "KEY"
    pem = _read_key(entry, option, entry.key_file, entry.key)
    where = f"{entry.env_prefix}{option}"
    try:
        private: Any = parse_pem_private_key(pem)
    except Exception:  # noqa: BLE001 - dkimpy's ASN.1 reader raises several kinds
        raise ConfigError(
            f"DKIM key for {entry.domain} ({where}) is not an RSA private key in PEM form "
            "(-----BEGIN RSA PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----)",
            name=where,
        ) from None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        openssl_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"DKIM key for {entry.domain} ({where}) is not an RSA private key in PEM form "
            "without a passphrase",
            name=where,
        ) from None
    bits = int(private["modulus"]).bit_length()
    if bits < 1024:
        raise ConfigError(
            f"DKIM key for {entry.domain} ({where}) has {bits} bits; receivers ignore RSA keys "
            "under 1024 bits (RFC 8301): use 2048",
            name=where,
        )
    seed = ed25519_selector = None
    if entry.ed25519_selector is not None:
        ed25519_selector = entry.ed25519_selector.encode("ascii")
        option = "ED25519_KEY_FILE" if entry.ed25519_key_file else "ED25519_KEY"
        seed = _read_key(entry, option, entry.ed25519_key_file, entry.ed25519_key)
        where = f"{entry.env_prefix}{option}"
        try:
            raw = base64.b64decode(seed, validate=True)
            SigningKey(raw)
        except (binascii.Error, ValueError, TypeError):
            raise ConfigError(
                f"DKIM key for {entry.domain} ({where}) is not an Ed25519 private key: "
                "expected the base64 of its 32-byte seed (what dkimpy's dknewkey writes)",
                name=where,
            ) from None
    return _Keys(
        domain=entry.domain.encode("ascii"),
        selector=entry.selector.encode("ascii"),
        rsa_pem=pem,
        rsa=openssl_key,
        ed25519_selector=ed25519_selector,
        ed25519_seed=seed,
    )
