"""Settings: one typed object, read from ``MAILQUEUE_*`` environment variables.

Every field has a documented default that runs the embedded stack (SQLite
file, kombu's SQLAlchemy transport on SQLite, the dev server on port 1025).
The two SQLite files are absolute paths in one folder per user
(``MAILQUEUE_HOME``, else the platform's user data folder: see
:func:`default_urls`), so that processes started in different working
directories share them.
Production sets ``MAILQUEUE_DATABASE_URL`` (PostgreSQL) and
``MAILQUEUE_BROKER_URL`` (Redis). Passwords belong in the relay URL's
environment variable or a file, never in rows or task payloads.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from .errors import ConfigError
from .message import Limits

__all__ = [
    "DEV_PORT",
    "KNOWN_NAMES",
    "ConfigError",
    "DkimKey",
    "RelayConfig",
    "Settings",
    "compare_databases",
    "configure",
    "default_urls",
    "get_settings",
    "hide_password",
    "is_secret_parameter",
    "url_passwords",
    "legacy_default_files",
    "mailqueue_home",
    "check_names",
    "settings_from_env",
    "setting_sources",
]


STARTTLS_MODES = ("required", "opportunistic", "off")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


DEV_PORT = 1025
"""The dev server's port and the default relay's (Mailpit's and Django's docs' choice).
Until issue #19 both were 2525, where a real MTA may listen; ``MAILQUEUE_RELAY_URL=
smtp://127.0.0.1:2525`` and ``mailqueue devserver --port 2525`` give the old pair."""


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Where and how to hand mail over: one SMTP relay, its TLS, AUTH and pool bounds.

    ``url`` is ``smtp://[user[:password]@]host[:port]`` (STARTTLS as
    ``starttls`` says) or ``smtps://…`` (implicit TLS, port 465). Any field
    below may also be given as a query parameter of the URL
    (``smtp://user@host:587?pool_size=10&tls_ca_file=/etc/ca.pem``); the URL
    wins over the keyword. Prefer ``password_file`` to a password in the URL.
    """

    name: str = "default"
    url: str = f"smtp://127.0.0.1:{DEV_PORT}"
    pool_size: int = 5
    """Most connections one worker process opens to this relay."""
    max_messages_per_connection: int = 100
    """Close a connection after it carried this many messages."""
    max_connection_age_s: float = 300.0
    """Close a connection this long after it was opened (Postfix: 300 s)."""
    idle_timeout_s: float = 10.0
    """Close a connection that sat idle this long."""
    check_after_idle_s: float = 1.0
    """Send NOOP before reusing a connection that sat idle longer than this."""
    connect_timeout_s: float = 30.0
    command_timeout_s: float = 300.0
    """Per SMTP command; RFC 5321 asks for minutes."""
    data_timeout_s: float = 600.0
    """Wait for the reply after the final dot (RFC 5321: 10 minutes)."""
    ehlo_name: str | None = None
    starttls: str | None = None
    """``required``, ``opportunistic`` or ``off``; default: required on port 587
    and whenever credentials are set, else opportunistic. Ignored for smtps://."""
    tls_verify: bool = True
    """Verify the relay's certificate chain. Turn off only on purpose."""
    tls_check_hostname: bool = True
    """Check the certificate names the relay's host."""
    tls_ca_file: str | None = None
    tls_ca_dir: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_min_version: str = "TLSv1.2"
    username: str | None = None
    password_file: str | None = None
    """Read the password from this file (mode 0600), instead of the URL."""
    auth_mechanisms: tuple[str, ...] | None = None
    """Mechanisms to use, in order of preference (default XOAUTH2 when a token
    provider is set, then CRAM-MD5, PLAIN, LOGIN), among those the relay offers."""
    token_provider: str | None = None
    """``module:callable`` returning an OAuth2 access token for XOAUTH2. Called
    as ``provider(username, refresh)``; ``refresh=True`` after the relay said
    the last token was refused. May be async."""
    allow_plaintext_auth: bool = False
    """Send credentials over an unencrypted connection. Never by default."""
    cluster_max_connections: int | None = None
    """Most connections open to this relay from all workers on all hosts together
    (kept in Redis, see ``smtp/cluster_limits.py``); ``pool_size`` still bounds
    each process."""
    rate_limit: float | None = None
    """Most messages per second to this relay from all workers together (Redis)."""
    rate_limit_burst: int | None = None
    """Messages that may go at once after a quiet spell, within ``rate_limit``
    (default: 50 ms worth, at least 1). It lets a sender that fell a little
    behind catch up, so the long-run rate reaches the limit."""
    cluster_wait_s: float = 120.0
    """Longest wait for a cluster-wide connection slot before the attempt is deferred."""
    dkim: str = "optional"
    """``required``: a message whose From domain has no DKIM key (``MAILQUEUE_DKIM__*``)
    is not sent through this relay; its recipients fail with an error that says so.
    ``optional``: it is sent unsigned."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("smtp", "smtps"):
            given = f", not {parts.scheme}://" if "://" in self.url else ""
            raise ValueError(
                f"relay {self.name!r}: the URL must start with smtp:// or smtps://{given} "
                "(e.g. smtp://user@mail.example.com:587 or smtps://mail.example.com:465)"
            )
        if "@" in parts.path or "@" in parts.fragment:
            # urllib ended the host at a '/', '?' or '#' inside the password.
            raise ValueError(
                f"relay {self.name!r}: {hide_password(self.url)} has an '@' after its host: "
                "percent-encode '/', '?', '#' and '@' in the user name and password"
            )
        try:
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError:
            raise ValueError(
                f"relay {self.name!r}: the port of {hide_password(self.url)} is not a number"
            ) from None
        if not parts.hostname:
            raise ValueError(f"relay {self.name!r}: URL has no host name")
        known = _RELAY_FIELDS
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known or key in ("name", "url"):
                if not key.isidentifier():  # not an option: maybe the tail of a password
                    raise ValueError(
                        f"relay {self.name!r}: the query of {hide_password(self.url)} is not "
                        "option=value pairs; percent-encode '/', '?', '#' and '@' in a password"
                    )
                raise ValueError(f"relay {self.name!r}: unknown URL option {key!r}")
            object.__setattr__(self, key, _convert_relay_field(key, value))
        if parts.username and self.username is None:
            object.__setattr__(self, "username", unquote(parts.username))
        if self.starttls is not None and self.starttls not in STARTTLS_MODES:
            raise ValueError(
                f"relay {self.name!r}: starttls must be one of {', '.join(STARTTLS_MODES)}"
            )
        if self.tls_min_version not in TLS_VERSIONS:
            raise ValueError(
                f"relay {self.name!r}: tls_min_version must be one of {', '.join(TLS_VERSIONS)}"
            )
        if (self.tls_client_key is not None) and self.tls_client_cert is None:
            raise ValueError(f"relay {self.name!r}: tls_client_key needs tls_client_cert")
        if self.dkim not in ("optional", "required"):
            raise ValueError(f"relay {self.name!r}: dkim must be optional or required")
        if self.pool_size < 1:
            raise ValueError(f"relay {self.name!r}: pool_size must be at least 1")
        if self.cluster_max_connections is not None and self.cluster_max_connections < 1:
            raise ValueError(f"relay {self.name!r}: cluster_max_connections must be at least 1")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"relay {self.name!r}: rate_limit must be above 0 messages/s")

    @property
    def has_cluster_limits(self) -> bool:
        """Whether this relay's limits are shared through Redis."""
        return bool(self.cluster_max_connections or self.rate_limit)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        if parts.port:
            return parts.port
        return 465 if parts.scheme == "smtps" else 25

    @property
    def implicit_tls(self) -> bool:
        return urlsplit(self.url).scheme == "smtps"

    @property
    def starttls_mode(self) -> str:
        """What STARTTLS does on this relay, with the default worked out."""
        if self.implicit_tls:
            return "off"
        if self.starttls is not None:
            return self.starttls
        if self.port == 587 or self.username:
            return "required"
        return "opportunistic"

    @property
    def password(self) -> str | None:
        """From ``password_file`` if set, else the URL. Never logged or stored."""
        if self.password_file:
            return _read_secret(self.password_file)
        password = urlsplit(self.url).password
        return unquote(password) if password else None

    @property
    def safe_url(self) -> str:
        """Scheme, user and host of the URL (password masked, path and query left
        out), fit for logs and ``--json``."""
        parts = urlsplit(self.url)  # validated: urllib's reading is the one used
        return hide_password(f"{parts.scheme}://{parts.netloc}")

    def describe(self) -> dict[str, Any]:
        """What operators may see: everything but secrets."""
        return {
            "name": self.name,
            "url": self.safe_url,
            "starttls": self.starttls_mode,
            "tls_verify": self.tls_verify,
            "tls_check_hostname": self.tls_check_hostname,
            "tls_min_version": self.tls_min_version,
            "username": self.username,
            "password": "set" if (self.password_file or urlsplit(self.url).password) else None,
            "auth": "XOAUTH2" if self.token_provider else ("login" if self.username else None),
            "pool_size": self.pool_size,
            "cluster_max_connections": self.cluster_max_connections,
            "rate_limit": self.rate_limit,
        }

    def __repr__(self) -> str:  # never print the password
        return f"RelayConfig(name={self.name!r}, url={self.safe_url!r}, pool_size={self.pool_size})"


def _convert_relay_field(key: str, value: Any) -> Any:
    """Convert a text value (URL query, environment, config file) to the field's type."""
    kind = _RELAY_TYPES[key]
    if not isinstance(value, str):
        return tuple(value) if kind == "tuple" else value
    if kind == "bool":
        return _to_bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind in ("optint", "optfloat"):
        if value.strip().lower() in ("", "none"):
            return None
        return float(value) if kind == "optfloat" else int(value)
    if kind == "tuple":
        return tuple(v.strip().upper() for v in value.split(",") if v.strip())
    return value or None if kind == "optstr" else value


_RELAY_TYPES = {
    "name": "str",
    "url": "str",
    "pool_size": "int",
    "max_messages_per_connection": "int",
    "max_connection_age_s": "float",
    "idle_timeout_s": "float",
    "check_after_idle_s": "float",
    "connect_timeout_s": "float",
    "command_timeout_s": "float",
    "data_timeout_s": "float",
    "ehlo_name": "optstr",
    "starttls": "optstr",
    "tls_verify": "bool",
    "tls_check_hostname": "bool",
    "tls_ca_file": "optstr",
    "tls_ca_dir": "optstr",
    "tls_client_cert": "optstr",
    "tls_client_key": "optstr",
    "tls_min_version": "str",
    "username": "optstr",
    "password_file": "optstr",
    "auth_mechanisms": "tuple",
    "token_provider": "optstr",
    "allow_plaintext_auth": "bool",
    "cluster_max_connections": "optint",
    "rate_limit": "optfloat",
    "rate_limit_burst": "optint",
    "cluster_wait_s": "float",
    "dkim": "str",
}
_RELAY_FIELDS = set(_RELAY_TYPES)
_RELAY_OPTIONS = _RELAY_FIELDS - {"name"}


def relay_from_options(name: str, options: Mapping[str, Any]) -> RelayConfig:
    """Build a relay from text options (environment or config file), converting types."""
    unknown = set(options) - _RELAY_FIELDS
    if unknown:
        bad = sorted(unknown)[0]
        close = _closest(bad, _RELAY_OPTIONS)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(
            f"relay {name!r}: unknown option(s) {', '.join(sorted(unknown))}{hint} "
            f"(options: {', '.join(sorted(_RELAY_OPTIONS))})",
            name=bad,
            suggestion=close,
        )
    converted = {}
    for key, value in options.items():
        if key == "name":
            continue
        try:
            converted[key] = _convert_relay_field(key, value)
        except ValueError:
            kind = _RELAY_TYPES[key].removeprefix("opt")
            what = {
                "int": "a whole number (e.g. 10)",
                "float": "a number (e.g. 2.5)",
                "bool": "true or false",
            }
            raise ConfigError(
                f"relay {name!r}: {key}={value!r} is not {what.get(kind, kind)}", name=key
            ) from None
    return RelayConfig(name=name, **converted)


DKIM_PREFIX = "MAILQUEUE_DKIM__"

_DKIM_OPTIONS = frozenset(
    {
        "domain",
        "selector",
        "key_file",
        "key",
        "ed25519_selector",
        "ed25519_key_file",
        "ed25519_key",
    }
)


@dataclass(frozen=True, kw_only=True)
class DkimKey:
    """Where the worker finds one sender domain's DKIM keys (``smtp/dkim.py`` signs).

    Set as ``MAILQUEUE_DKIM__<NAME>__<OPTION>``: ``<NAME>`` is the domain with
    ``_`` for ``.`` (``EXAMPLE_COM``), or any name with a ``DOMAIN`` option
    (for a domain holding ``-``). The RSA key (PEM) is required, from
    ``KEY_FILE`` or ``KEY``; an Ed25519 key (base64 of the 32-byte seed, as
    dkimpy's ``dknewkey`` writes it) adds a second signature (RFC 8463).
    Keys are read only by the worker, and never shown: not in ``repr``, logs
    or ``--json``.
    """

    name: str
    domain: str
    selector: str
    key_file: str | None = None
    key: str | None = field(default=None, repr=False)
    ed25519_selector: str | None = None
    ed25519_key_file: str | None = None
    ed25519_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = f"{DKIM_PREFIX}{self.name.upper()}__"
        if not re.fullmatch(
            r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+", self.domain
        ):
            raise ConfigError(
                f"DKIM domain {self.domain!r} ({where}DOMAIN) is not a domain name "
                "(e.g. example.com; an internationalized one in its xn-- form)",
                name=f"{where}DOMAIN",
            )
        if not self.selector:
            raise ConfigError(
                f"DKIM for {self.domain}: set {where}SELECTOR", name=f"{where}SELECTOR"
            )
        for option, value in (
            ("SELECTOR", self.selector),
            ("ED25519_SELECTOR", self.ed25519_selector),
        ):
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", value):
                raise ConfigError(
                    f"{where}{option}={value!r} is not a DKIM selector "
                    "(letters, digits, '-', '_', '.')",
                    name=f"{where}{option}",
                )
        if (self.key_file is None) == (self.key is None):
            raise ConfigError(
                f"DKIM for {self.domain}: set one of {where}KEY_FILE (a PEM file, mode 0600) "
                f"or {where}KEY (the PEM text)",
                name=f"{where}KEY_FILE",
            )
        ed25519 = (self.ed25519_selector, self.ed25519_key_file, self.ed25519_key)
        if any(v is not None for v in ed25519):
            if not self.ed25519_selector:
                raise ConfigError(
                    f"DKIM for {self.domain}: an Ed25519 key needs {where}ED25519_SELECTOR",
                    name=f"{where}ED25519_SELECTOR",
                )
            if (self.ed25519_key_file is None) == (self.ed25519_key is None):
                raise ConfigError(
                    f"DKIM for {self.domain}: set one of {where}ED25519_KEY_FILE "
                    f"or {where}ED25519_KEY",
                    name=f"{where}ED25519_KEY_FILE",
                )

    @property
    def env_prefix(self) -> str:
        """The ``MAILQUEUE_DKIM__<NAME>__`` its options are set under (for messages)."""
        return f"{DKIM_PREFIX}{self.name.upper()}__"

    def describe(self) -> dict[str, Any]:
        """What operators may see: domain, selectors and where the keys come from."""
        return {
            "domain": self.domain,
            "selector": self.selector,
            "key": f"file {self.key_file}" if self.key_file else "environment",
            "ed25519_selector": self.ed25519_selector,
            "ed25519_key": (
                None
                if self.ed25519_selector is None
                else f"file {self.ed25519_key_file}"
                if self.ed25519_key_file
                else "environment"
            ),
        }

    def __repr__(self) -> str:  # never print a key
        return (
            f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, "
            f"ed25519_selector={self.ed25519_selector!r})"
        )


def dkim_from_options(name: str, options: Mapping[str, str]) -> DkimKey:
    """Build one domain's DKIM settings from text options (``MAILQUEUE_DKIM__<NAME>__*``)."""
    unknown = set(options) - _DKIM_OPTIONS
    if unknown:
        bad = sorted(unknown)[0]
        close = _closest(bad, _DKIM_OPTIONS)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(
            f"DKIM {name!r}: unknown option(s) {', '.join(sorted(unknown))}{hint} "
            f"(options: {', '.join(sorted(_DKIM_OPTIONS))})",
            name=bad,
            suggestion=close,
        )
    values = {
        k: (v.strip() if k not in ("key", "ed25519_key") else v) or None for k, v in options.items()
    }
    domain = (values.pop("domain", None) or name.replace("_", ".")).lower().rstrip(".")
    return DkimKey(name=name, domain=domain, selector=values.pop("selector", None) or "", **values)


HOME_NAME = "MAILQUEUE_HOME"
LEGACY_DATABASE_FILE = "mailqueue.db"
"""The relative default of versions before issue #19, in the working directory."""
LEGACY_BROKER_FILE = "mailqueue-broker.db"


def mailqueue_home(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of the default SQLite database and broker: ``MAILQUEUE_HOME``, else the
    platform's user data folder (``platformdirs.user_data_dir("mailqueue")``, e.g.
    ``~/.local/share/mailqueue`` on Linux). Always absolute, so that every process of
    one user finds the same files whatever its working directory."""
    env = os.environ if environ is None else environ
    given = env.get(HOME_NAME)
    if given:
        home = Path(given).expanduser()
        if not home.is_absolute():
            raise ConfigError(
                f"{HOME_NAME}={given!r} is not an absolute path: a relative folder differs "
                "between processes started in different directories; give a full path",
                name=HOME_NAME,
            )
        return home
    import platformdirs

    return Path(platformdirs.user_data_dir("mailqueue", appauthor=False))


def legacy_default_files(environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """``{"database": …, "broker": …}``: the files of the old relative default found in
    the working directory, which the default keeps using (see :func:`default_urls`).

    Only without ``MAILQUEUE_HOME`` (setting it is a choice), and only files that are
    not already the files in the home folder."""
    env = os.environ if environ is None else environ
    if env.get(HOME_NAME):
        return {}
    home = mailqueue_home(env)
    found = {}
    for what, name in (("database", LEGACY_DATABASE_FILE), ("broker", LEGACY_BROKER_FILE)):
        here = Path(name).absolute()
        if here.is_file() and here != home / name:
            found[what] = here
    return found


def default_urls(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The default database and broker URLs: absolute SQLite files in
    :func:`mailqueue_home` (created here, mode 0700), or an older version's
    ``./mailqueue.db`` / ``./mailqueue-broker.db`` still in the working directory
    (kept, so its mail is not abandoned; every start line warns about it)."""
    env = os.environ if environ is None else environ
    home = mailqueue_home(env)
    legacy = legacy_default_files(env)
    paths = {
        "database": legacy.get("database", home / LEGACY_DATABASE_FILE),
        "broker": legacy.get("broker", home / LEGACY_BROKER_FILE),
    }
    if set(legacy) != set(paths):
        try:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create mailqueue's default folder {home} ({exc.strerror}): set "
                f"{HOME_NAME} to a writable folder, or MAILQUEUE_DATABASE_URL and "
                "MAILQUEUE_BROKER_URL",
                name=HOME_NAME,
            ) from None
    return {
        "database": f"sqlite:///{paths['database']}",
        "broker": f"sqla+sqlite:///{paths['broker']}",
    }


_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


def _database_place(url: str) -> tuple[str, str, str] | None:
    """``(backend, server, database)`` of a database URL, comparable across spellings:
    the driver dropped, a SQLite file made absolute (symlinks resolved), the local
    host's names and sockets as one, the default port filled in. ``None`` for an
    in-memory SQLite database (never shared)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    backend = scheme.split("+", 1)[0].lower()
    backend = {"postgres": "postgresql", "sqla": "sqlite"}.get(backend, backend)
    if backend == "sqlite":
        path = unquote(rest.removeprefix("/").split("?", 1)[0])
        if not path or path == ":memory:" or path.startswith("file:"):
            return None
        return ("sqlite", "", os.path.realpath(path))
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = (query.get("host") or parts.hostname or "").lower()
    server = "local" if host in _LOCAL_HOSTS or host.startswith("/") else host
    try:
        port = parts.port
    except ValueError:
        port = None
    default_port = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(backend)
    port_text = str(query.get("port") or port or default_port or "")
    return (backend, f"{server}:{port_text}", unquote(parts.path.lstrip("/")))


def compare_databases(a: str, b: str) -> str:
    """Whether two database URLs name one database: ``"same"``, ``"different"``, or
    ``"unsure"`` (same kind and database name on servers spelled differently, which
    may be one server under two names). For the frameworks' same-database mode."""
    place_a, place_b = _database_place(a), _database_place(b)
    if place_a is None or place_b is None:
        return "different"
    if place_a == place_b:
        return "same"
    if place_a[0] == place_b[0] and place_a[2] == place_b[2] and place_a[0] != "sqlite":
        return "unsure"
    return "different"


def _default_database_url() -> str:
    return default_urls()["database"]


BOUNCE_SECRET_ENV = "MAILQUEUE_BOUNCE_SECRET"


def _default_broker_url() -> str:
    return default_urls()["broker"]


UNSUBSCRIBE_SECRET_MIN = 16
"""Characters of each unsubscribe secret, at least (``secrets.token_urlsafe(32)`` gives 43)."""


def _check_unsubscribe(url: str | None, mailto: str | None, secret: str | None) -> None:
    """One-click unsubscribe settings (RFC 8058): an https URL, a bare address, real keys."""
    if url is not None:
        parts = urlsplit(url)
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if (
            parts.scheme not in ("https", "http")
            or (parts.scheme == "http" and not loopback)
            or not parts.hostname
            or parts.query
            or parts.fragment
            or any(c in url for c in ' <>,"\r\n\t')
        ):
            raise ConfigError(
                f"MAILQUEUE_UNSUBSCRIBE_URL={url!r} must be the https:// address where "
                "mailqueue web is reachable from the internet, without query or fragment "
                "(RFC 8058 wants HTTPS; http:// only for localhost), "
                "e.g. https://mail.example.com",
                name="MAILQUEUE_UNSUBSCRIBE_URL",
            )
    if mailto is not None and not re.fullmatch(r"[^@\s<>,;:\"()\[\]\\]+@[A-Za-z0-9.-]+", mailto):
        raise ConfigError(
            f"MAILQUEUE_UNSUBSCRIBE_MAILTO={mailto!r} must be one bare ASCII address, "
            "e.g. unsubscribe@example.com",
            name="MAILQUEUE_UNSUBSCRIBE_MAILTO",
        )
    if secret is not None:
        keys = [k.strip() for k in secret.split(",")]
        short = [n + 1 for n, k in enumerate(keys) if len(k) < UNSUBSCRIBE_SECRET_MIN]
        if short:
            raise ConfigError(
                f"MAILQUEUE_UNSUBSCRIBE_SECRET: secret number {short[0]} of {len(keys)} is "
                f"shorter than {UNSUBSCRIBE_SECRET_MIN} characters; use a random one, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                name="MAILQUEUE_UNSUBSCRIBE_SECRET",
            )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a process needs to enqueue, deliver and schedule."""

    database_url: str = field(default_factory=_default_database_url)
    broker_url: str = field(default_factory=_default_broker_url)
    relay: RelayConfig = field(default_factory=RelayConfig)
    max_message_size: int = 35 * 1024 * 1024
    """Refuse a message bigger than this at enqueue (bytes, after encoding)."""
    max_header_length: int = 8192
    """Characters in one header value, display name or file name."""
    max_headers: int = 100
    """Custom header fields in one message."""
    max_header_block: int = 102400
    """Bytes in a message's finished top header block (Postfix's header_size_limit)."""
    max_recipients: int = 1000
    """Recipients of one message (Postfix's smtpd_recipient_limit)."""
    message_lifetime_s: float = 5 * 24 * 3600
    """Give up on recipients still deferred this long after enqueue (Postfix: 5 days)."""
    retry_base_s: float = 300.0
    """First deferral waits about this long; each further one doubles."""
    retry_max_s: float = 4000.0
    """Deferrals never wait longer than this (Postfix: ~67 min)."""
    lease_s: float = 300.0
    """A claimed message is released for another worker after this long."""
    batch_size: int = 200
    """Message ids per Celery task. Each task pays a claim, smaller group commits
    and the drain at its end, so bigger batches cost less per message; smaller
    ones spread a burst over more worker processes. The measured trade:
    ops/bench/README.md, "Batch size"."""
    redispatch_after_s: float = 300.0
    """The scheduler re-sends a queued message's id after this long unclaimed."""
    scheduler_interval_s: float = 5.0
    queue_name: str = "mailqueue"
    on_terminal: str | None = None
    """``module:callable`` the worker calls with a ``MessageInfo`` when a message
    reaches a terminal status (sent, partial, failed, cancelled, suppressed)."""
    relays: Mapping[str, RelayConfig] = field(default_factory=dict)
    """Further named relays; a message names one with ``relay=``."""
    limits_redis_url: str | None = None
    """Redis for the relays' cluster-wide limits; default: the broker, when it is Redis."""
    commit_before_reuse: bool = False
    """Hold each connection until the outcome of the message it carried is committed
    (issue #21): a worker killed mid-batch then resends at most one message per
    connection, however slow the commit, at a measured cost in throughput
    (ops/bench/README.md, "The duplicate window")."""
    dispatch: str = "background"
    """How enqueue hands committed ids to the broker: ``background`` (a thread, so the
    call returns after its commit; see ``worker/handoff.py``) or ``inline``."""
    api_max_body: int | None = None
    """Largest JSON API request body in bytes; default ``api_body_limit`` (below)."""
    api_max_depth: int = 32
    """Deepest nesting of arrays/objects the JSON API accepts (a message needs 3)."""
    web_session_s: float = 12 * 3600
    """A status page login lasts this long (sessions live in the web process)."""
    web_auth_failures_per_min: int = 10
    """Wrong tokens (login or bearer) one client address may send per minute."""
    bounce_domain: str | None = None
    """With it, each recipient is sent with its own signed return path
    ``b+<token>@<bounce_domain>`` (``bounces/verp.py``), so a bounce names its row.
    The HMAC secret is ``MAILQUEUE_BOUNCE_SECRET``, read from the environment only."""
    bounce_suppress: bool = True
    """A recipient that a report turns ``bounced`` or ``complained`` also puts its
    address on the suppression list (everywhere), so no later mail goes to it."""
    suppression_local_case_insensitive: bool = False
    """Compare suppressed addresses' local parts ignoring case (``Bob@x`` = ``bob@x``).
    Off by default: RFC 5321 leaves the local part's case to the receiving host.
    Keys are computed when an entry is written, so after changing this, export
    the list and import it again (``mailqueue suppress export|import``)."""
    dkim: Mapping[str, DkimKey] = field(default_factory=dict)
    """DKIM keys by sender domain (``MAILQUEUE_DKIM__<NAME>__<OPTION>``): the worker
    signs a message whose From domain is here, and sends the others unsigned."""
    unsubscribe_url: str | None = None
    """Public base URL of ``mailqueue web`` (``https://mail.example.com``): the worker
    writes ``<url>/u/<token>`` into the List-Unsubscribe header of ``unsubscribe=True``
    messages (see ``unsubscribe.py``); enqueue refuses such messages without it."""
    unsubscribe_mailto: str | None = None
    """An address added to List-Unsubscribe as ``mailto:`` (the app reads that mailbox)."""
    unsubscribe_secret: str | None = field(default=None, repr=False)
    """HMAC key(s) of the unsubscribe tokens, comma-separated: the first signs, every one
    verifies (rotation). Needed by workers and ``mailqueue web``; never stored or shown."""
    unsubscribe_per_min: int = 300
    """Unsubscribe requests (``/u/<token>``) one client address may make per minute;
    Gmail and Yahoo post one-click unsubscribes from a few addresses, so keep it high."""
    on_unsubscribe: str | None = None
    """``module:callable`` that ``mailqueue web`` calls with an ``Unsubscribe`` after it
    recorded the suppression, for apps that keep their own preferences."""

    def __post_init__(self) -> None:
        if self.dispatch not in ("background", "inline"):
            raise ValueError(
                f"MAILQUEUE_DISPATCH must be 'background' or 'inline', not {self.dispatch!r}"
            )
        if self.api_max_body is not None and self.api_max_body < 1:
            raise ValueError("MAILQUEUE_API_MAX_BODY must be at least 1 byte")
        if self.api_max_depth < 3:
            raise ValueError("MAILQUEUE_API_MAX_DEPTH must be at least 3 (a message needs 3)")
        if self.web_auth_failures_per_min < 1:
            raise ValueError("MAILQUEUE_WEB_AUTH_FAILURES_PER_MIN must be at least 1")
        if self.unsubscribe_per_min < 1:
            raise ValueError("MAILQUEUE_UNSUBSCRIBE_PER_MIN must be at least 1")
        _check_unsubscribe(self.unsubscribe_url, self.unsubscribe_mailto, self.unsubscribe_secret)
        if self.bounce_domain is not None:
            domain = self.bounce_domain
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", domain):
                raise ValueError(
                    f"MAILQUEUE_BOUNCE_DOMAIN must be a plain domain name, not {domain!r}"
                )
            if len(os.environ.get(BOUNCE_SECRET_ENV, "").encode()) < 16:
                raise ValueError(
                    f"MAILQUEUE_BOUNCE_DOMAIN is set, so {BOUNCE_SECRET_ENV} must be too: "
                    "at least 16 random bytes (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`), the same in the environment of "
                    "every worker and of the processes that read bounces"
                )
        limited = [r.name for r in self.all_relays if r.has_cluster_limits]
        if limited and self.cluster_redis_url is None:
            raise ValueError(
                f"relay(s) {', '.join(limited)} set cluster_max_connections or rate_limit, "
                "which all workers share through Redis: set MAILQUEUE_LIMITS_REDIS_URL "
                "(or use a redis:// broker)"
            )

    @property
    def bounce_secret(self) -> bytes:
        """The VERP HMAC secret, from the environment each time: never a field, so
        it is in no repr, dump or row."""
        return os.environ.get(BOUNCE_SECRET_ENV, "").encode()

    @property
    def limits(self) -> Limits:
        """What one message may hold (``message.Limits``), from these settings."""
        return Limits(
            max_header_length=self.max_header_length,
            max_headers=self.max_headers,
            max_header_block=self.max_header_block,
            max_recipients=self.max_recipients,
        )

    @property
    def api_body_limit(self) -> int:
        """``api_max_body``, or by default 1.5 × ``max_message_size`` + 64 KiB.

        Attachments travel base64-encoded in the JSON as in the message, so a
        body that fits the message limit is about as large as the message;
        the half on top leaves room for JSON's escapes (a client that writes
        ``\\u4e2d`` for each CJK character sends 6 bytes where the mail
        carries 4), the 64 KiB for the fields around. Anything bigger would be
        refused by the message limit anyway, after costing its full size in
        memory several times over: it is refused before it is read.
        """
        if self.api_max_body is not None:
            return self.api_max_body
        return self.max_message_size * 3 // 2 + 64 * 1024

    @property
    def cluster_redis_url(self) -> str | None:
        """Where the cluster-wide relay limits live (None: no Redis configured)."""
        if self.limits_redis_url:
            return self.limits_redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    def relay_named(self, name: str | None) -> RelayConfig:
        """The relay called ``name`` (``None`` or ``"default"``: the default relay)."""
        if name is None or name == "default" or name == self.relay.name:
            return self.relay
        try:
            return self.relays[name]
        except KeyError:
            known = ", ".join(["default", *sorted(self.relays)])
            raise KeyError(f"no relay named {name!r} (configured: {known})") from None

    @property
    def all_relays(self) -> list[RelayConfig]:
        return [self.relay, *(r for n, r in sorted(self.relays.items()) if n != self.relay.name)]

    def __repr__(self) -> str:
        limits = self.limits_redis_url and hide_password(self.limits_redis_url)
        return (
            f"Settings(database_url={hide_password(self.database_url)!r}, "
            f"broker_url={hide_password(self.broker_url)!r}, "
            f"limits_redis_url={limits!r}, relay={self.relay!r})"
        )


SECRET_PARAMETERS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "token",
        "key",
        "apikey",
        "api_key",
        "access_key",
        "secret_key",
        "private_key",
        "auth",
        "credential",
        "credentials",
        "sig",
        "signature",
    }
)
"""Query parameter names whose value ``hide_password`` masks (any case, ``-`` as ``_``).

So are names ending in ``password``, ``passwd``, ``secret`` or ``token``
(``sslpassword``, ``client_secret``, ``access_token``…). Not ``sslkey``,
``sslcert`` or ``password_file``: they name files, and the operator needs to
see which."""

_SECRET_SUFFIXES = ("password", "passwd", "secret", "token")
_SCHEME = re.compile(r"\s*[A-Za-z][\w+.-]*://")
_AUTHORITY = re.compile(r"[^/?#]*")
# How SQLAlchemy's make_url reads a password: from the first ':' after the user
# name up to the next '@', across any '/', '?' or '#'.
_SQLALCHEMY_PASSWORD = re.compile(r"[^:/]*:(?P<password>[^@]*)@")
MASK = "***"


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter called ``name`` holds a secret."""
    key = unquote_plus(name).strip().lower().replace("-", "_")
    return key in SECRET_PARAMETERS or key.endswith(_SECRET_SUFFIXES)


def url_passwords(url: str | None) -> list[str]:
    """The password in ``url`` as written and percent-decoded (either may turn up in
    an error's text), or nothing: for masking secrets in text that is not a URL."""
    try:
        password = urlsplit(str(url)).password if url else None
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def hide_password(url: str) -> str:
    """``url`` fit to show: its password and secret query parameters replaced by ``***``.

    The one masking function for every URL mailqueue shows (``migrate``,
    ``repr(settings)``, relay lists, log lines). The password is masked as
    both urllib (kombu, the relays) and SQLAlchemy read it, since they split
    a password holding an unencoded ``/``, ``?`` or ``@`` differently. Query
    parameters named in :data:`SECRET_PARAMETERS` are masked whatever the
    scheme, ``?password=`` as well as ``?sslpassword=`` or ``&Access_Token=``.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    start = scheme.end()
    spans = []
    authority = _AUTHORITY.match(url, start)
    userinfo, at, _ = authority.group().rpartition("@") if authority else ("", "", "")
    if at and ":" in userinfo:
        spans.append((start + userinfo.index(":") + 1, start + len(userinfo)))
    sqlalchemy = _SQLALCHEMY_PASSWORD.match(url, start)
    if sqlalchemy is not None:
        spans.append(sqlalchemy.span("password"))
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if end <= begin:
            continue  # an empty password hides nothing
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    parts, done = [], 0
    for begin, end in merged:
        parts += [url[done:begin], MASK]
        done = end
    parts.append(url[done:])
    return _hide_secret_parameters("".join(parts), start)


def _hide_secret_parameters(url: str, start: int) -> str:
    """Mask ``name=value`` after the first ``?`` when ``name`` is a secret's.

    Pairs are split on ``&`` (what SQLAlchemy and urllib's ``parse_qsl`` do)
    and also looked for after a ``;``; a secret's value is masked up to the
    next ``&``, so a value holding ``;`` or ``#`` does not show its tail.
    """
    query_at = url.find("?", start)
    if query_at < 0:
        return url
    pairs = url[query_at + 1 :].split("&")
    for index, pair in enumerate(pairs):
        offset = 0
        for piece in pair.split(";"):
            name, eq, _ = piece.partition("=")
            if eq and is_secret_parameter(name):
                pairs[index] = pair[: offset + len(name) + 1] + MASK
                break
            offset += len(piece) + 1
    return url[: query_at + 1] + "&".join(pairs)


# env name -> (Settings field or "relay.<field>", converter)
_ENV: dict[str, tuple[str, Any]] = {
    "MAILQUEUE_DATABASE_URL": ("database_url", str),
    "MAILQUEUE_BROKER_URL": ("broker_url", str),
    "MAILQUEUE_MAX_MESSAGE_SIZE": ("max_message_size", int),
    "MAILQUEUE_MAX_HEADER_LENGTH": ("max_header_length", int),
    "MAILQUEUE_MAX_HEADERS": ("max_headers", int),
    "MAILQUEUE_MAX_HEADER_BLOCK": ("max_header_block", int),
    "MAILQUEUE_MAX_RECIPIENTS": ("max_recipients", int),
    "MAILQUEUE_MESSAGE_LIFETIME_S": ("message_lifetime_s", float),
    "MAILQUEUE_RETRY_BASE_S": ("retry_base_s", float),
    "MAILQUEUE_RETRY_MAX_S": ("retry_max_s", float),
    "MAILQUEUE_LEASE_S": ("lease_s", float),
    "MAILQUEUE_BATCH_SIZE": ("batch_size", int),
    "MAILQUEUE_REDISPATCH_AFTER_S": ("redispatch_after_s", float),
    "MAILQUEUE_SCHEDULER_INTERVAL_S": ("scheduler_interval_s", float),
    "MAILQUEUE_QUEUE": ("queue_name", str),
    "MAILQUEUE_ON_TERMINAL": ("on_terminal", str),
    "MAILQUEUE_LIMITS_REDIS_URL": ("limits_redis_url", str),
    "MAILQUEUE_DISPATCH": ("dispatch", str),
    "MAILQUEUE_COMMIT_BEFORE_REUSE": ("commit_before_reuse", _to_bool),
    "MAILQUEUE_RELAY_URL": ("relay.url", str),
    "MAILQUEUE_POOL_SIZE": ("relay.pool_size", int),
    "MAILQUEUE_POOL_MAX_MESSAGES": ("relay.max_messages_per_connection", int),
    "MAILQUEUE_POOL_MAX_AGE_S": ("relay.max_connection_age_s", float),
    "MAILQUEUE_POOL_IDLE_TIMEOUT_S": ("relay.idle_timeout_s", float),
    "MAILQUEUE_SMTP_CONNECT_TIMEOUT_S": ("relay.connect_timeout_s", float),
    "MAILQUEUE_SMTP_COMMAND_TIMEOUT_S": ("relay.command_timeout_s", float),
    "MAILQUEUE_SMTP_DATA_TIMEOUT_S": ("relay.data_timeout_s", float),
    "MAILQUEUE_EHLO_NAME": ("relay.ehlo_name", str),
    "MAILQUEUE_RELAY_PASSWORD_FILE": ("relay.password_file", str),
    "MAILQUEUE_API_MAX_BODY": ("api_max_body", int),
    "MAILQUEUE_API_MAX_DEPTH": ("api_max_depth", int),
    "MAILQUEUE_WEB_SESSION_S": ("web_session_s", float),
    "MAILQUEUE_WEB_AUTH_FAILURES_PER_MIN": ("web_auth_failures_per_min", int),
    "MAILQUEUE_BOUNCE_DOMAIN": ("bounce_domain", str),
    "MAILQUEUE_BOUNCE_SUPPRESS": ("bounce_suppress", _to_bool),
    "MAILQUEUE_SUPPRESSION_LOCAL_CASE_INSENSITIVE": (
        "suppression_local_case_insensitive",
        _to_bool,
    ),
    "MAILQUEUE_UNSUBSCRIBE_URL": ("unsubscribe_url", str),
    "MAILQUEUE_UNSUBSCRIBE_MAILTO": ("unsubscribe_mailto", str),
    "MAILQUEUE_UNSUBSCRIBE_SECRET": ("unsubscribe_secret", str),
    "MAILQUEUE_UNSUBSCRIBE_PER_MIN": ("unsubscribe_per_min", int),
    "MAILQUEUE_ON_UNSUBSCRIBE": ("on_unsubscribe", str),
}


OTHER_NAMES: dict[str, str] = {
    "MAILQUEUE_CONFIG": "a TOML file with the same settings (config.settings_from_env)",
    "MAILQUEUE_HOME": "the folder of the default SQLite database and broker (config)",
    "MAILQUEUE_LOG_JSON": "log JSON lines (logging_setup)",
    "MAILQUEUE_BOUNCE_SECRET": "the VERP return paths' HMAC secret, env only (config, bounces)",
    "MAILQUEUE_METRICS_PORT": "Prometheus metrics port of worker and scheduler (metrics)",
    "MAILQUEUE_METRICS_ADDR": "the address the metrics listen on (metrics)",
    "MAILQUEUE_EVENT_LOOP": "the worker's event loop, uvloop or asyncio (worker/loop.py)",
    "MAILQUEUE_HEALTH_FILE": "the worker's heartbeat file for health probes (worker/liveness.py)",
    "MAILQUEUE_WORKER_STALL_S": "idle seconds before a worker exits 1 (worker/liveness.py)",
    "MAILQUEUE_WEB_TOKEN": "the token of mailqueue web (cli)",
    "MAILQUEUE_DEFAULT_SENDER": "Flask: the default From (contrib.flask)",
    "MAILQUEUE_DJANGO_RELAY": "Django: the relay of the email backend (contrib.django)",
    "MAILQUEUE_DJANGO_PRIORITY": "Django: the lane of the email backend's mail (contrib.django)",
    "MAILQUEUE_DJANGO_DATABASE": "Django: the database whose transaction decides (contrib.django)",
    "MAILQUEUE_DJANGO_SAME_DATABASE": "Django: rows through Django's connection (contrib.django)",
    "MAILQUEUE_DJANGO_ADMIN_DATABASE": "Django: the alias the admin reads (contrib.django_admin)",
    "MAILQUEUE_SCALE_ROWS": "rows of the scale test (tests/test_web_scale.py)",
    "MAILQUEUE_UPDATE_SCREENSHOT": "rewrite docs/status-page.png (tests/test_web_browser.py)",
}
"""``MAILQUEUE_*`` names read elsewhere than :class:`Settings`, with who reads them."""

FREE_PREFIXES = ("MAILQUEUE_TEST_", "MAILQUEUE_BENCH_")
"""Names under these prefixes belong to the test suite and ``ops/bench``: never checked."""

RELAY_PREFIX = "MAILQUEUE_RELAY__"

KNOWN_NAMES = frozenset(_ENV) | frozenset(OTHER_NAMES)
"""Every ``MAILQUEUE_*`` name some part of mailqueue reads (the one list; a test
greps the repository to keep it whole), besides ``MAILQUEUE_RELAY__<NAME>__<OPTION>``,
``MAILQUEUE_DKIM__<DOMAIN>__<OPTION>`` and the free prefixes. Any other
``MAILQUEUE_*`` name is a :class:`ConfigError`."""


def _closest(name: str, candidates: Any) -> str | None:
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def check_names(names: Any, source: str) -> None:
    """Refuse any ``MAILQUEUE_*`` name in ``names`` that mailqueue does not read.

    ``source`` says where the names were found ("environment", "Django
    settings", "Flask config"). The error names the closest known name
    (difflib), or the relay option closest to a misspelled one in
    ``MAILQUEUE_RELAY__<NAME>__<OPTION>``.
    """
    for name in sorted(n for n in names if isinstance(n, str) and n.startswith("MAILQUEUE_")):
        if name in KNOWN_NAMES or name.startswith(FREE_PREFIXES):
            continue
        if name.startswith(DKIM_PREFIX):
            _check_option_name(name, source, DKIM_PREFIX, _DKIM_OPTIONS, "DKIM")
            continue
        if name.startswith(RELAY_PREFIX):
            _check_option_name(name, source, RELAY_PREFIX, _RELAY_OPTIONS, "relay")
            continue
        stem = _closest(name.removeprefix("MAILQUEUE_"), {n[10:] for n in KNOWN_NAMES})
        suggestion = f"MAILQUEUE_{stem}" if stem else None
        hint = (
            f"did you mean {suggestion}?"
            if suggestion
            else "docs/configuration.md lists every name"
        )
        raise ConfigError(
            f"{name} ({source}) is not a mailqueue setting; {hint}",
            name=name,
            suggestion=suggestion,
            source=source,
        )


def _check_option_name(
    name: str, source: str, prefix: str, options: Collection[str], kind: str
) -> None:
    """``<prefix><NAME>__<OPTION>`` (a named relay or DKIM key): refuse a malformed
    name, or an option not in ``options``, naming the closest option."""
    key_name, sep, option = name.removeprefix(prefix).partition("__")
    placeholder, example = _OPTION_NAME_FORMS[kind]
    if not sep or not key_name or not option:
        raise ConfigError(
            f"{name} ({source}): expected {prefix}{placeholder}__<OPTION>, e.g. {example}",
            name=name,
            source=source,
        )
    if option.lower() in options:
        return
    close = _closest(option.lower(), options)
    suggestion = f"{prefix}{key_name}__{close.upper()}" if close else None
    listed = sorted(options) if kind == "relay" else sorted(o.upper() for o in options)
    hint = f"did you mean {suggestion}?" if suggestion else f"the options are {', '.join(listed)}"
    what = (
        f"unknown option {option.lower()!r} of relay {key_name.lower()!r}"
        if kind == "relay"
        else f"unknown DKIM option {option.lower()!r}"
    )
    raise ConfigError(
        f"{name} ({source}): {what}; {hint}", name=name, suggestion=suggestion, source=source
    )


_OPTION_NAME_FORMS = {
    "relay": ("<NAME>", "MAILQUEUE_RELAY__BULK__URL"),
    "DKIM": ("<DOMAIN>", "MAILQUEUE_DKIM__EXAMPLE_COM__KEY_FILE"),
}


_WHAT = {int: "a whole number (e.g. 10)", float: "a number (e.g. 2.5)", str: "text"}


def _convert_env(name: str, raw: Any, convert: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return convert(raw.strip() if convert is not str else raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not {_WHAT.get(convert, convert.__name__)}", name=name
        ) from None


def settings_from_env(
    environ: Mapping[str, str] | None = None, *, source: str = "environment"
) -> Settings:
    """Build settings from ``MAILQUEUE_*`` variables (and ``MAILQUEUE_CONFIG``, a TOML file).

    The environment wins over the file. Relays: ``MAILQUEUE_RELAY_URL`` and
    its neighbours set the default relay; ``MAILQUEUE_RELAY__<NAME>__<OPTION>``
    sets any option of any relay (``DEFAULT`` is the default one), e.g.
    ``MAILQUEUE_RELAY__BULK__URL=smtp://user@smtp.example.net:587``.

    Every mistake is a :class:`ConfigError` (a ``ValueError``) that says what
    and where: an unknown ``MAILQUEUE_*`` name (with the closest known one),
    a value of the wrong kind, a missing or broken file, a bad relay URL.
    """
    env = os.environ if environ is None else environ
    check_names(env, source)
    try:
        return _build(env)
    except ConfigError:
        raise
    except ValueError as exc:  # the dataclasses' own checks
        raise ConfigError(hide_urls(str(exc))) from None


def hide_urls(text: str) -> str:
    """``text`` with every URL in it passed through :func:`hide_password`."""
    return re.sub(r"[A-Za-z][\w+.-]*://\S+", lambda m: hide_password(m.group()), text)


def _build(env: Mapping[str, str]) -> Settings:
    top: dict[str, Any] = {}
    relays: dict[str, dict[str, Any]] = {}
    config_file = env.get("MAILQUEUE_CONFIG")
    if config_file:
        top, relays = _read_config_file(config_file)
    default = relays.setdefault("default", {})
    for name, (target, convert) in _ENV.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        value = _convert_env(name, raw, convert)
        if target.startswith("relay."):
            default[target.removeprefix("relay.")] = value
        else:
            top[target] = value
    for key, raw in env.items():
        if key.startswith(RELAY_PREFIX) and raw != "":
            relay_name, sep, option = key.removeprefix(RELAY_PREFIX).partition("__")
            if not sep or not relay_name or not option:
                raise ConfigError(f"{key}: expected MAILQUEUE_RELAY__<NAME>__<OPTION>", name=key)
            relays.setdefault(relay_name.lower(), {})[option.lower()] = raw
    dkim: dict[str, dict[str, str]] = {}
    for key, raw in env.items():
        if key.startswith(DKIM_PREFIX) and raw != "":
            key_name, _, option = key.removeprefix(DKIM_PREFIX).partition("__")
            dkim.setdefault(key_name.lower(), {})[option.lower()] = raw
    built = {name: relay_from_options(name, options) for name, options in relays.items()}
    default_relay = built.pop("default")
    keys: dict[str, DkimKey] = {}
    for name, options in sorted(dkim.items()):
        entry = dkim_from_options(name, options)
        if entry.domain in keys:
            raise ConfigError(
                f"DKIM domain {entry.domain} is set twice ({keys[entry.domain].env_prefix}* "
                f"and {entry.env_prefix}*); keep one",
                name=entry.env_prefix + "DOMAIN",
            )
        keys[entry.domain] = entry
    if keys:
        top["dkim"] = keys
    if "database_url" not in top or "broker_url" not in top:
        defaults = default_urls(env)
        top.setdefault("database_url", defaults["database"])
        top.setdefault("broker_url", defaults["broker"])
    return Settings(relay=default_relay, relays=built, **top)


_FIELD_CONVERTERS = {target: convert for target, convert in _ENV.values() if "." not in target}


def _read_config_file(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``[mailqueue]`` settings, ``[relay]`` (the default) and ``[relays.<name>]`` tables."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(
            f"MAILQUEUE_CONFIG={path}: cannot read the file ({exc.strerror}); "
            "fix the path or unset MAILQUEUE_CONFIG",
            name="MAILQUEUE_CONFIG",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"MAILQUEUE_CONFIG={path} is not valid TOML: {exc}", name="MAILQUEUE_CONFIG"
        ) from None
    tables = ("mailqueue", "relay", "relays")
    for table in data:
        if table not in tables:
            close = _closest(table, tables)
            hint = f"; did you mean [{close}]?" if close else ""
            raise ConfigError(
                f"{path}: unknown table [{table}]{hint} (tables: [mailqueue], [relay], "
                "[relays.<name>])",
                name=table,
                suggestion=close,
                source=path,
            )
    known = {f.name for f in fields(Settings)} - {"relay", "relays", "dkim"}
    top = dict(data.get("mailqueue", {}))
    for key in sorted(set(top) - known):
        close = _closest(key, known)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(
            f"{path}: unknown setting {key!r} in [mailqueue]{hint}",
            name=key,
            suggestion=close,
            source=path,
        )
    for key, value in top.items():
        if key in _FIELD_CONVERTERS:
            top[key] = _convert_env(f"{path}: {key}", value, _FIELD_CONVERTERS[key])
    relays = {str(k).lower(): dict(v) for k, v in data.get("relays", {}).items()}
    if "relay" in data:
        relays["default"] = dict(data["relay"])
    return top, relays


def setting_sources(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where the database, broker and each relay URL come from: ``environment``,
    the config file's path, or ``default`` (for a process's start line)."""
    env = os.environ if environ is None else environ
    file_top: dict[str, Any] = {}
    file_relays: dict[str, dict[str, Any]] = {}
    path = env.get("MAILQUEUE_CONFIG")
    if path:
        with contextlib.suppress(ConfigError):  # settings_from_env has said so already
            file_top, file_relays = _read_config_file(path)

    def origin(env_name: str, in_file: bool) -> str:
        if env.get(env_name):
            return "environment"
        return f"file {path}" if in_file else "default"

    sources = {
        "database": origin("MAILQUEUE_DATABASE_URL", "database_url" in file_top),
        "broker": origin("MAILQUEUE_BROKER_URL", "broker_url" in file_top),
    }
    default_in_env = env.get("MAILQUEUE_RELAY_URL") or env.get(f"{RELAY_PREFIX}DEFAULT__URL")
    sources["relay default"] = (
        "environment"
        if default_in_env
        else origin("MAILQUEUE_RELAY_URL", "url" in file_relays.get("default", {}))
    )
    names = set(file_relays) | {
        k.removeprefix(RELAY_PREFIX).partition("__")[0].lower()
        for k in env
        if k.startswith(RELAY_PREFIX)
    }
    for name in sorted(names - {"default"}):
        in_file = "url" in file_relays.get(name, {})
        sources[f"relay {name}"] = (
            "environment"
            if env.get(f"{RELAY_PREFIX}{name.upper()}__URL")
            else (f"file {path}" if in_file else "default")
        )
    return sources


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the secret file {path}: {exc.strerror}") from None


_current: Settings | None = None
_on_configure: list[Callable[[], None]] = []


def on_configure(hook: Callable[[], None]) -> Callable[[], None]:
    """Call ``hook`` after each :func:`configure` (a layer above drops what it built).

    The package registers the reset of its engines and Celery app here, so that
    settings never import the layers built from them.
    """
    if hook not in _on_configure:
        _on_configure.append(hook)
    return hook


def get_settings() -> Settings:
    """The process-wide settings: from :func:`configure`, else the environment."""
    global _current
    if _current is None:
        _current = settings_from_env()
    return _current


def configure(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Replace the process-wide settings (tests, embedding apps).

    ``configure(database_url=...)`` starts from the environment and overrides
    fields; ``configure(settings)`` installs a ready object. Resets cached
    engines and Celery apps that were built from the old settings.
    """
    global _current
    base = settings if settings is not None else settings_from_env()
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    _current = replace(base, **overrides) if overrides else base
    for hook in _on_configure:
        hook()
    return _current
