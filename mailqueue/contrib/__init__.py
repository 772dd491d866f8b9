"""Integrations with web frameworks: Django (``contrib.django``) and Flask (``contrib.flask``).

Both read the same ``MAILQUEUE_*`` names as the environment (see the
configuration table, docs/configuration.md), from Django's settings or Flask's ``app.config``, and
install them with :func:`mailqueue.configure`: every setting, the named relays
(``MAILQUEUE_RELAY__<NAME>__<OPTION>``) and ``MAILQUEUE_CONFIG`` (the TOML
file) alike. Values in the framework's configuration win over the
environment; anything not given there still comes from the environment,
exactly as a worker started with the same variables would see it. A
``MAILQUEUE_*`` name that mailqueue does not read is a ``ConfigError`` that
names the closest known one, as it is in the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import (
    _ENV,
    RELAY_PREFIX,
    ConfigError,
    Settings,
    check_names,
    configure,
    get_settings,
    settings_from_env,
)

__all__ = ["CONFIG_NAMES", "FrameworkConfig", "apply_config", "settings_from_mapping"]

CONFIG_NAMES = frozenset(_ENV) | {"MAILQUEUE_CONFIG"}
"""The flat ``MAILQUEUE_*`` names that make :class:`~mailqueue.config.Settings`
(besides ``MAILQUEUE_RELAY__<NAME>__<OPTION>``); ``config.KNOWN_NAMES`` is every
name mailqueue reads."""


class FrameworkConfig(dict[str, Any]):
    """A framework's ``MAILQUEUE_*`` values, and where they came from (for errors)."""

    def __init__(self, source: str, values: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        super().__init__(values)
        self.source = source


def _makes_settings(name: str) -> bool:
    return name in CONFIG_NAMES or name.startswith(RELAY_PREFIX)


def _as_text(value: Any) -> str:
    """A framework value as the environment would spell it (``True``, ``5``, a list)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_from_mapping(
    config: Mapping[str, Any], *, source: str | None = None
) -> Settings | None:
    """Settings from the ``MAILQUEUE_*`` keys of ``config`` over the environment.

    ``source`` ("Django settings", "Flask config"; default: ``config.source``
    for a :class:`FrameworkConfig`) is named in errors. Raises
    ``ConfigError`` for an unknown ``MAILQUEUE_*`` key. Returns ``None`` when
    ``config`` has no setting (the environment alone then applies, as it
    always does).
    """
    where = source or getattr(config, "source", None) or "framework configuration"
    names = [n for n in config if isinstance(n, str) and n.startswith("MAILQUEUE_")]
    check_names(names, where)
    given = {
        name: _as_text(config[name])
        for name in names
        if _makes_settings(name) and config[name] is not None and config[name] != ""
    }
    if not given:
        return None
    try:
        return settings_from_env({**os.environ, **given})
    except ConfigError as exc:
        if exc.source is None and exc.name in given:
            raise ConfigError(f"{exc.reason} ({where})", name=exc.name, source=where) from None
        raise


def apply_config(config: Mapping[str, Any], *, source: str | None = None) -> Settings:
    """Install the settings ``config`` describes, unless they are already in force.

    Cheap when nothing changed, so it may be called on every send;
    :func:`mailqueue.configure` (which drops cached engines) runs only when
    the settings differ from the current ones.
    """
    settings = settings_from_mapping(config, source=source)
    if settings is None or settings == get_settings():
        return get_settings()
    return configure(settings)
