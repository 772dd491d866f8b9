"""Apply the Alembic migrations from code (``mailqueue migrate``, the tests), and
check that a database is ready before a command uses it.

:func:`require_schema` is what every command that reads or writes the tables
calls first: it turns the mistakes a newcomer makes (no tables yet, the wrong
or an unreachable database, a missing driver, a database migrated by a newer
or older mailqueue) into one :class:`~mailqueue.errors.ConfigError` that names
the database (password hidden) and what to do.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .config import get_settings, hide_password
from .errors import ConfigError
from .store.db import get_engine, is_missing_tables, normalize_url

__all__ = [
    "SchemaError",
    "alembic_config",
    "database_error",
    "is_missing_tables",
    "require_schema",
    "upgrade",
]

TABLE = "mq_message"
"""The table whose absence means "never migrated"."""


class SchemaError(ConfigError):
    """The database has no mailqueue tables, or not the revision this code needs."""


def _script_location() -> str:
    # In a source checkout the top-level migrations/ folder; when installed,
    # the same files packaged as mailqueue._migrations.
    here = Path(__file__).resolve().parent.parent / "migrations"
    if (here / "env.py").exists():
        return str(here)
    return str(resources.files("mailqueue._migrations"))


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _script_location())
    cfg.set_main_option(
        "sqlalchemy.url", normalize_url(database_url or get_settings().database_url)
    )
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``database_url`` (default: the settings') to ``revision``."""
    url = database_url or get_settings().database_url
    try:
        command.upgrade(alembic_config(url), revision)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise database_error(exc, url) from None
    except CommandError as exc:  # a revision this code does not have: a newer mailqueue's
        raise SchemaError(
            f"cannot migrate the database at {hide_password(url)}: {exc}; if a newer "
            "mailqueue migrated it, upgrade mailqueue"
        ) from None


_RUN_MIGRATE = (
    "run `mailqueue migrate` (or point MAILQUEUE_DATABASE_URL at the database your "
    "app and workers use)"
)


def require_schema(database_url: str | None = None) -> None:
    """Raise :class:`SchemaError` unless the database has mailqueue's tables at the
    code's revision; :class:`ConfigError` when it cannot be reached at all.

    A SQLite file that does not exist is reported, not created. A database
    whose tables were made without Alembic (``create_all`` in a test app) is
    accepted: there is no revision to compare.
    """
    url = database_url or get_settings().database_url
    shown = hide_password(url)
    parsed = _parse(url)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file and file != ":memory:" and not os.path.exists(file):
        raise SchemaError(
            f"the database at {shown} ({os.path.abspath(file)}) does not exist, so it has no "
            f"mailqueue tables: {_RUN_MIGRATE}"
        )
    try:
        with get_engine(url).connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(TABLE):
                raise SchemaError(
                    f"the database at {shown} has no mailqueue tables: {_RUN_MIGRATE}"
                )
            current: set[str] = set()
            if inspector.has_table("alembic_version"):
                rows = conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                current = {str(r) for r in rows.scalars()}
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise database_error(exc, url) from None
    if not current:
        return
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    if current == heads:
        return
    known = {rev.revision for rev in script.walk_revisions()}
    if current - known:
        raise SchemaError(
            f"the database at {shown} is at revision {', '.join(sorted(current))}, newer than "
            f"this mailqueue knows (head {', '.join(sorted(heads))}): upgrade mailqueue"
        )
    raise SchemaError(
        f"the database at {shown} is at revision {', '.join(sorted(current))}, older than this "
        f"mailqueue's (head {', '.join(sorted(heads))}): run `mailqueue migrate`"
    )


def _parse(url: str) -> sa.engine.URL:
    try:
        return sa.engine.make_url(normalize_url(url))
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"MAILQUEUE_DATABASE_URL={hide_password(url)!r} is not a database URL "
            "(e.g. sqlite:////var/lib/mailqueue/mailqueue.db or postgresql://user@host/db)",
            name="MAILQUEUE_DATABASE_URL",
        ) from None


_DRIVERS = {"psycopg": "postgres", "psycopg2": "postgres"}


def database_error(exc: BaseException, url: str | None = None) -> ConfigError:
    """``exc`` (from SQLAlchemy or a driver import) as one line that says what to do."""
    url = url or get_settings().database_url
    shown = hide_password(url)
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, ImportError):
        module = (exc.name or str(exc)).split(".")[0]
        extra = _DRIVERS.get(module)
        fix = f"pip install 'mailqueue[{extra}]'" if extra else f"install {module}"
        return ConfigError(
            f"the database at {shown} needs the {module!r} driver, which is not installed: {fix}",
            name="MAILQUEUE_DATABASE_URL",
        )
    if is_missing_tables(exc):
        return SchemaError(f"the database at {shown} has no mailqueue tables: {_RUN_MIGRATE}")
    if isinstance(exc, sa.exc.NoSuchModuleError | sa.exc.ArgumentError):
        return ConfigError(
            f"MAILQUEUE_DATABASE_URL={shown!r} names no database SQLAlchemy knows "
            "(use sqlite:///path or postgresql://user@host/db)",
            name="MAILQUEUE_DATABASE_URL",
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = hide_password(first[0]) if first else type(exc).__name__
        return ConfigError(
            f"cannot use the database at {shown}: {reason}; check MAILQUEUE_DATABASE_URL "
            "and that the server is up",
            name="MAILQUEUE_DATABASE_URL",
        )
    first = str(exc).strip().splitlines()
    return ConfigError(
        f"the database at {shown} failed: {hide_password(first[0]) if first else exc!r}",
        name="MAILQUEUE_DATABASE_URL",
    )
