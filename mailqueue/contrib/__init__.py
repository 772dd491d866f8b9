"""Integrations with web frameworks: Django (``contrib.django``) and Flask (``contrib.flask``).

Both read the same ``MAILQUEUE_*`` names as the environment (see the README's
configuration table), from Django's settings or Flask's ``app.config``, and
install them with :func:`mailqueue.configure`. Values in the framework's
configuration win over the environment; anything not given there still comes
from the environment, exactly as a worker started with the same variables
would see it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..config import _ENV, Settings, configure, get_settings, settings_from_env

__all__ = ["CONFIG_NAMES", "apply_config", "settings_from_mapping"]

CONFIG_NAMES = frozenset(_ENV) | {"MAILQUEUE_RELAY_PASSWORD_FILE"}
"""The ``MAILQUEUE_*`` names the integrations read from the framework's configuration."""


def settings_from_mapping(config: Mapping[str, Any]) -> Settings | None:
    """Settings from the ``MAILQUEUE_*`` keys of ``config`` over the environment.

    Returns ``None`` when ``config`` has none of them (the environment alone
    then applies, as it always does).
    """
    given = {
        name: str(config[name])
        for name in CONFIG_NAMES
        if name in config and config[name] is not None and config[name] != ""
    }
    if not given:
        return None
    return settings_from_env({**os.environ, **given})


def apply_config(config: Mapping[str, Any]) -> Settings:
    """Install the settings ``config`` describes, unless they are already in force.

    Cheap when nothing changed, so it may be called on every send;
    :func:`mailqueue.configure` (which drops cached engines) runs only when
    the settings differ from the current ones.
    """
    settings = settings_from_mapping(config)
    if settings is None or settings == get_settings():
        return get_settings()
    return configure(settings)
