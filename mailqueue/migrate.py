"""Apply the Alembic migrations from code: ``mailqueue migrate`` and the tests."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config

from .config import get_settings
from .store.db import normalize_url

__all__ = ["upgrade", "alembic_config"]


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
    command.upgrade(alembic_config(database_url), revision)
