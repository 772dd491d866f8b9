"""Django settings and Flask's ``app.config`` reach every ``MAILQUEUE_*`` setting.

Named relays (``MAILQUEUE_RELAY__<NAME>__<OPTION>``) and ``MAILQUEUE_CONFIG``
(the TOML file) included; a misspelt ``MAILQUEUE_*`` name there is a
``ConfigError`` that names the closest known one and says where it was
found. Django runs in a child process configured with ``settings.configure``
(as a project's settings module would), so the session's own Django setup in
``test_django.py`` is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from flask import Flask

import mailqueue
from mailqueue.config import settings_from_env
from mailqueue.contrib import settings_from_mapping
from mailqueue.contrib.flask import MailQueue
from mailqueue.errors import ConfigError


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "mailqueue.toml"
    path.write_text(
        '[mailqueue]\nbatch_size = 40\n[relays.bulk]\nurl = "smtp://bulk.example.net:2525"\n'
    )
    return path


@pytest.fixture
def restore_settings():
    yield
    mailqueue._reset_caches()
    mailqueue.configure(settings_from_env({}))


def test_flask_config_reaches_named_relays_and_the_config_file(
    tmp_path, toml_file, restore_settings
):
    app = Flask(__name__)
    app.config.update(
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mq.db'}",
        MAILQUEUE_CONFIG=str(toml_file),
        MAILQUEUE_RELAY__SES__URL="smtp://user@ses.example.net:587",
        MAILQUEUE_RELAY__SES__POOL_SIZE=3,  # a Python value, not text
        MAILQUEUE_RELAY__SES__AUTH_MECHANISMS=["plain", "login"],
        MAILQUEUE_RELAY__DEFAULT__TLS_VERIFY=False,
        MAILQUEUE_DEFAULT_SENDER="shop@example.com",
    )
    MailQueue(app)
    settings = mailqueue.get_settings()
    ses, bulk = settings.relay_named("ses"), settings.relay_named("bulk")
    assert (ses.url, ses.pool_size, ses.auth_mechanisms) == (
        "smtp://user@ses.example.net:587",
        3,
        ("PLAIN", "LOGIN"),
    )
    assert bulk.url == "smtp://bulk.example.net:2525"
    assert settings.batch_size == 40
    assert settings.relay.tls_verify is False


def test_a_misspelt_name_in_flask_config_is_refused_with_the_closest_one(restore_settings):
    app = Flask(__name__)
    app.config.update(MAILQUEUE_RELAY_ULR="smtp://mail.example.com:587")
    with pytest.raises(ConfigError) as caught:
        MailQueue(app)
    error = caught.value
    assert (error.name, error.suggestion, error.source) == (
        "MAILQUEUE_RELAY_ULR",
        "MAILQUEUE_RELAY_URL",
        "Flask config",
    )
    assert str(error) == (
        "MAILQUEUE_RELAY_ULR (Flask config) is not a mailqueue setting; "
        "did you mean MAILQUEUE_RELAY_URL?"
    )


def test_a_bad_value_in_a_framework_config_says_where_it_came_from():
    with pytest.raises(ConfigError, match=r"MAILQUEUE_POOL_SIZE='lots' .*\(Django settings\)"):
        settings_from_mapping({"MAILQUEUE_POOL_SIZE": "lots"}, source="Django settings")


def test_framework_only_names_are_known_but_make_no_settings():
    assert (
        settings_from_mapping(
            {
                "MAILQUEUE_DJANGO_SAME_DATABASE": True,
                "MAILQUEUE_DEFAULT_SENDER": "a@example.com",
                "MAIL_SERVER": "smtp.example.com",
            },
            source="Flask config",
        )
        is None
    )


DJANGO_CHILD = textwrap.dedent(
    """
    import json, sys
    import django
    from django.conf import settings

    settings.configure(**json.loads(sys.argv[1]))
    django.setup()
    import mailqueue
    from mailqueue.contrib.django import EmailBackend
    from mailqueue.errors import ConfigError

    try:
        EmailBackend()
    except ConfigError as exc:
        print(json.dumps({"error": str(exc), "name": exc.name, "suggestion": exc.suggestion,
                          "source": exc.source}))
        sys.exit(0)
    s = mailqueue.get_settings()
    print(json.dumps({"relays": {r.name: [r.url, r.pool_size] for r in s.all_relays},
                      "batch_size": s.batch_size, "queue": s.queue_name}))
    """
)


def _django(**settings: object) -> dict:
    base = {"EMAIL_BACKEND": "mailqueue.contrib.django.EmailBackend", "INSTALLED_APPS": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    child = subprocess.run(
        [sys.executable, "-c", DJANGO_CHILD, json.dumps({**base, **settings})],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def test_django_settings_reach_named_relays_and_the_config_file(tmp_path, toml_file):
    result = _django(
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mq.db'}",
        MAILQUEUE_CONFIG=str(toml_file),
        MAILQUEUE_QUEUE="from-django",
        MAILQUEUE_RELAY__SES__URL="smtp://ses.example.net:587",
        MAILQUEUE_RELAY__SES__POOL_SIZE=7,
        MAILQUEUE_DJANGO_SAME_DATABASE=False,
    )
    assert result == {
        "relays": {
            "default": ["smtp://127.0.0.1:1025", 5],
            "bulk": ["smtp://bulk.example.net:2525", 5],
            "ses": ["smtp://ses.example.net:587", 7],
        },
        "batch_size": 40,
        "queue": "from-django",
    }


def test_a_misspelt_name_in_django_settings_is_refused_with_the_closest_one():
    result = _django(MAILQUEUE_DJANGO_SAME_DATABSE=True)
    assert result == {
        "error": "MAILQUEUE_DJANGO_SAME_DATABSE (Django settings) is not a mailqueue setting; "
        "did you mean MAILQUEUE_DJANGO_SAME_DATABASE?",
        "name": "MAILQUEUE_DJANGO_SAME_DATABSE",
        "suggestion": "MAILQUEUE_DJANGO_SAME_DATABASE",
        "source": "Django settings",
    }
