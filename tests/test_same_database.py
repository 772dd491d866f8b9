"""Same-database mode and ``MAILQUEUE_DATABASE_URL`` must agree (issue #19, item 9).

With Flask's ``MailQueue(app, db=db)`` or Django's ``same_database`` mode the
rows go through the framework's connection, while workers and the CLI read
``MAILQUEUE_DATABASE_URL``. When the two name different databases the mail is
never delivered (before: the first ``send`` failed with ``no such table:
mq_message``, naming neither). Now setting up the extension or the backend
refuses, naming both URLs (passwords hidden) and what to set.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

import mailqueue
from mailqueue.config import compare_databases, configure, get_settings
from mailqueue.contrib.flask import MailQueue, Message
from mailqueue.errors import ConfigError
from mailqueue.migrate import upgrade

# -- comparing URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ("sqlite:////srv/app.db", "sqlite:////srv/./app.db", "same"),
        ("sqlite:////srv/app.db", "sqlite:////srv/other.db", "different"),
        ("postgresql+psycopg://app:pw@localhost/shop", "postgresql://127.0.0.1:5432/shop", "same"),
        ("postgresql:///shop?host=/var/run/postgresql", "postgres://localhost/shop", "same"),
        ("postgresql://db.internal/shop", "postgresql://db.internal/mail", "different"),
        ("postgresql://db.internal/shop", "postgresql://10.0.0.5/shop", "unsure"),
        ("postgresql://db.internal/shop", "postgresql://db.internal:6432/shop", "unsure"),
        ("postgresql://localhost/shop", "sqlite:////srv/shop", "different"),
        ("sqlite://", "sqlite://", "different"),  # two in-memory databases are two
    ],
)
def test_compare_databases(a, b, verdict):
    assert compare_databases(a, b) == verdict
    assert compare_databases(b, a) == verdict


def test_a_symlinked_sqlite_file_is_the_same_database(tmp_path):
    (tmp_path / "real.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "real.db")
    link, real = f"sqlite:///{tmp_path / 'link.db'}", f"sqlite:///{tmp_path}/real.db"
    assert compare_databases(link, real) == "same"


# -- Flask ------------------------------------------------------------------------------


@pytest.fixture
def restore_settings(monkeypatch):
    """Flask's init_app installs settings process-wide: put the test's back after."""
    monkeypatch.delenv("MAILQUEUE_DATABASE_URL", raising=False)
    saved = get_settings()
    yield
    mailqueue._reset_caches()
    configure(saved)


def flask_app(tmp_path: Path, **config: object) -> tuple[Flask, SQLAlchemy]:
    app = Flask("shop", instance_path=str(tmp_path / "instance"))
    app.config.update(MAILQUEUE_DEFAULT_SENDER="shop@example.com", **config)
    db = SQLAlchemy()
    db.init_app(app)
    return app, db


def test_flask_refuses_a_mailqueue_database_other_than_the_apps(tmp_path, restore_settings):
    app, db = flask_app(
        tmp_path,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'shop.db'}",
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mail.db'}",
    )
    with pytest.raises(ConfigError) as raised:
        MailQueue(app, db=db)
    assert str(raised.value) == (
        "MailQueue(app, db=db) writes mail rows through db.session into the app's database "
        f"sqlite:///{tmp_path / 'shop.db'} (SQLALCHEMY_DATABASE_URI), but "
        f"MAILQUEUE_DATABASE_URL (Flask config) is sqlite:///{tmp_path / 'mail.db'}, the "
        "database mailqueue's workers and CLI read: mail written there would never be "
        "delivered. Set MAILQUEUE_DATABASE_URL to the app's database (in the Flask config "
        "and in every worker's environment), or give no db= to keep mailqueue's rows in a "
        "database of their own"
    )
    assert raised.value.name == "MAILQUEUE_DATABASE_URL"


def test_flask_names_the_environment_and_hides_passwords(tmp_path, restore_settings, monkeypatch):
    monkeypatch.setenv("MAILQUEUE_DATABASE_URL", "postgresql://mq:mqsecret@db.internal/mail")
    app, db = flask_app(
        tmp_path, SQLALCHEMY_DATABASE_URI="postgresql+psycopg://shop:shopsecret@db.internal/shop"
    )
    with pytest.raises(ConfigError) as raised:
        MailQueue(app, db=db)
    text = str(raised.value)
    assert "mqsecret" not in text and "shopsecret" not in text
    assert "postgresql+psycopg://shop:***@db.internal/shop (SQLALCHEMY_DATABASE_URI)" in text
    assert "MAILQUEUE_DATABASE_URL (environment) is postgresql://mq:***@db.internal/mail" in text


def test_flask_relative_sqlite_is_the_instance_folders_file(tmp_path, restore_settings):
    """Flask-SQLAlchemy puts ``sqlite:///shop.db`` in the instance folder; a
    MAILQUEUE_DATABASE_URL naming ./shop.db in the working directory is another file."""
    app, db = flask_app(
        tmp_path,
        SQLALCHEMY_DATABASE_URI="sqlite:///shop.db",
        MAILQUEUE_DATABASE_URL=f"sqlite:///{Path.cwd() / 'shop.db'}",
    )
    with pytest.raises(ConfigError, match=r"instance/shop\.db \(SQLALCHEMY_DATABASE_URI\)"):
        MailQueue(app, db=db)


def test_flask_without_a_mailqueue_url_uses_the_apps_database(tmp_path, restore_settings):
    """No MAILQUEUE_DATABASE_URL: mailqueue's database becomes the app's (the instance
    folder's file), and a message sent in db.session is there after the commit."""
    (tmp_path / "instance").mkdir()
    app, db = flask_app(tmp_path, SQLALCHEMY_DATABASE_URI="sqlite:///shop.db")
    upgrade(f"sqlite:///{tmp_path / 'instance' / 'shop.db'}")
    mail = MailQueue(app, db=db)
    assert get_settings().database_url == f"sqlite:///{tmp_path / 'instance' / 'shop.db'}"
    with app.app_context():
        message_id = mail.send(Message("Order", recipients=["ana@example.org"], body="hi"))
        db.session.commit()
        assert mailqueue.get_status(message_id).status == "queued"


def test_flask_agreeing_urls_spelled_differently_are_accepted(tmp_path, restore_settings):
    app, db = flask_app(
        tmp_path,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'shop.db'}",
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path}/./shop.db",
    )
    MailQueue(app, db=db)
    assert get_settings().database_url == f"sqlite:///{tmp_path}/./shop.db"


def test_flask_same_database_name_on_other_host_names_is_a_warning(
    tmp_path, restore_settings, caplog
):
    app, db = flask_app(
        tmp_path,
        SQLALCHEMY_DATABASE_URI="postgresql+psycopg://db.internal/shop",
        MAILQUEUE_DATABASE_URL="postgresql+psycopg://10.0.0.5/shop",
    )
    with caplog.at_level(logging.WARNING, logger="mailqueue.flask"):
        MailQueue(app, db=db)
    (record,) = [r for r in caplog.records if r.name == "mailqueue.flask"]
    assert "if both name one server, nothing is wrong" in record.getMessage()


# -- Django (a child process each: Django is set up once per process) ------------------

DJANGO_CHILD = textwrap.dedent(
    """
    import json, sys
    import django
    from django.conf import settings

    settings.configure(**json.loads(sys.argv[1]))
    django.setup()
    from django.core.exceptions import ImproperlyConfigured
    from django.core.mail import get_connection, send_mail

    try:
        if sys.argv[2] == "send":
            send_mail("Order", "hi", "shop@example.com", ["ana@example.org"])
        else:
            get_connection()
    except ImproperlyConfigured as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    print(json.dumps({"done": sys.argv[2]}))
    """
)


def django_child(
    database: dict, environ: dict[str, str] | None = None, *, send: bool = False, **settings: object
) -> tuple[dict, str]:
    """Set Django up in a child with ``settings``, then make the backend (or ``send``
    one mail): the error, or ``{"done": …}``, and the child's stderr."""
    base = {
        "EMAIL_BACKEND": "mailqueue.contrib.django.EmailBackend",
        "INSTALLED_APPS": [],
        "DATABASES": {"default": database},
        "MAILQUEUE_DJANGO_SAME_DATABASE": True,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    env.update(environ or {})
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            DJANGO_CHILD,
            json.dumps({**base, **settings}),
            "send" if send else "backend",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout), child.stderr


SQLITE = "django.db.backends.sqlite3"


def test_django_refuses_a_mailqueue_database_other_than_djangos(tmp_path):
    out, _ = django_child(
        {"ENGINE": SQLITE, "NAME": str(tmp_path / "shop.db")},
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mail.db'}",
    )
    assert out["error"] == (
        "mailqueue's same_database mode writes mail rows through Django's database 'default' "
        f"(sqlite:///{tmp_path / 'shop.db'}), but mailqueue's database is "
        f"sqlite:///{tmp_path / 'mail.db'} (Django settings), the one its workers and CLI "
        "read: mail written there would never be delivered; set MAILQUEUE_DATABASE_URL = "
        f'"sqlite:///{tmp_path / "shop.db"}" (with its password, if any) in Django\'s '
        "settings and in every worker's environment, or turn same_database off"
    )


def test_django_without_a_mailqueue_url_is_refused_with_the_url_to_set(tmp_path):
    """Nothing set: mailqueue's default (the user data folder) is not Django's database."""
    out, _ = django_child(
        {"ENGINE": SQLITE, "NAME": str(tmp_path / "shop.db")},
        environ={"XDG_DATA_HOME": str(tmp_path / "xdg")},
    )
    assert (
        f"but mailqueue's database is sqlite:///{tmp_path / 'xdg' / 'mailqueue' / 'mailqueue.db'} "
        "(default)"
    ) in out["error"]
    assert f'set MAILQUEUE_DATABASE_URL = "sqlite:///{tmp_path / "shop.db"}"' in out["error"]


def test_django_postgres_names_the_environment_and_hides_the_password(tmp_path):
    out, _ = django_child(
        {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "shop",
            "USER": "shop",
            "PASSWORD": "shopsecret",
            "HOST": "db.internal",
            "PORT": "5432",
        },
        environ={"MAILQUEUE_DATABASE_URL": "postgresql://mq:mqsecret@db.internal/mail"},
    )
    assert "mqsecret" not in out["error"] and "shopsecret" not in out["error"]
    assert "Django's database 'default' (postgresql://shop@db.internal:5432/shop)" in out["error"]
    assert (
        "mailqueue's database is postgresql://mq:***@db.internal/mail (environment)"
        in (out["error"])
    )


def test_django_agreeing_databases_queue_the_mail(tmp_path):
    upgrade(f"sqlite:///{tmp_path / 'shop.db'}")
    out, _ = django_child(
        {"ENGINE": SQLITE, "NAME": str(tmp_path / "shop.db")},
        send=True,
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path}/./shop.db",
        MAILQUEUE_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )
    assert out == {"done": "send"}
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM mq_message")).scalar() == 1
    engine.dispose()


def test_django_in_memory_test_database_is_a_warning(tmp_path):
    """Django's test runner puts SQLite in memory, which no worker can share: a WARNING."""
    out, stderr = django_child(
        {"ENGINE": SQLITE, "NAME": ":memory:"},
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mail.db'}",
    )
    assert out == {"done": "backend"}
    assert "Django's database 'default' (sqlite://)" in stderr
    assert "unless both name one database, mail is never delivered" in stderr
