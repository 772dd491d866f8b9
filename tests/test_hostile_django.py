"""Hostile inputs through Django (issue #15): ``EmailMessage(...).send()`` with mailqueue's backend.

The same cases and the same judge as ``tests/test_hostile.py`` (see
``tests/hostile.py``), through ``django.core.mail`` and
``mailqueue.contrib.django.EmailBackend`` (``EMAIL_BACKEND`` on Django 5.2,
``MAILERS`` on 6.1, from ``tests/django_project``). A refusal here is what
Django's own SMTP backend raises for the same input: a ``ValueError``
(``BadHeaderError`` for header injection, ``sanitize_address``/``prep_address``
for an entry that is not one address); never a TypeError, an IndexError or
an AttributeError.

The default run tests Django 5.2 on Python 3.11; ``make test-django61`` runs
this file again with Django 6.1 on the unpatched Python 3.12.1, where the
backend serializes with the modern ``email`` API.
"""

from __future__ import annotations

import os

import django
import pytest
import sqlalchemy as sa

from tests import hostile
from tests.conftest import _check_postgres
from tests.hostile import ANA, Case, check, matrix

FACES = ("django",)


def _setup_django(tmp_path_factory, request) -> None:
    """Set the project of ``tests/test_django.py`` up, exactly as its session fixture
    would, unless that already happened.

    Django reads its settings once per process, so whichever module comes first
    decides them for both: the same SQLite file (that fixture's first
    ``mktemp("django")`` is ``basetemp/django0``) and the same PostgreSQL
    database (conftest's session ``pg_database``) when one is reachable. The
    hostile cases themselves only need the backend; their rows go to the
    module's own SQLite store (the backend's separate-database mode).
    """
    from django.conf import settings

    if settings.configured:
        return
    environ = {
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "MQ_DJANGO_SQLITE": str(tmp_path_factory.getbasetemp() / "django0" / "app.db"),
    }
    if _check_postgres() is None:
        url = sa.engine.make_url(request.getfixturevalue("pg_database"))
        environ.update(
            MQ_DJANGO_PG_NAME=url.database,
            MQ_DJANGO_PG_USER=url.username or "",
            MQ_DJANGO_PG_PASSWORD=url.password or "",
            MQ_DJANGO_PG_HOST=url.host or "127.0.0.1",
            MQ_DJANGO_PG_PORT=str(url.port or 5432),
        )
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    try:
        django.setup()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    _setup_django(tmp_path_factory, request)
    with hostile.environment(tmp_path_factory.mktemp("hostile-django")) as e:
        yield e


@pytest.fixture(autouse=True)
def _fresh(env):
    env.reset()
    yield
    env.reset()


def test_backend_is_mailqueue():
    """The harness sends through mailqueue's backend (not Django's SMTP or locmem)."""
    from mailqueue.contrib.django import EmailBackend

    if django.VERSION >= (6, 1):
        from django.core.mail import mailers

        backend = mailers.default
    else:
        from django.core.mail import get_connection

        backend = get_connection()
    assert isinstance(backend, EmailBackend), django.get_version()


@pytest.mark.parametrize(("face", "case"), matrix(hostile.BENIGN_CASES, FACES))
def test_benign_control_is_delivered_clean(env, face, case):
    outcome = check(face, case, env)
    assert isinstance(outcome, hostile.Delivered), outcome


@pytest.mark.parametrize(("face", "case"), matrix(hostile.ENCODED_WORD_CASES, FACES))
def test_encoded_words_never_put_a_header_or_recipient_on_the_wire(env, face, case):
    check(face, case, env)


@pytest.mark.parametrize(("face", "case"), matrix(hostile.QUOTED_NAME_CASES, FACES))
def test_quoted_display_name_is_delivered_whole(env, face, case):
    outcome = check(face, case, env)
    assert isinstance(outcome, hostile.Delivered), outcome
    assert sorted(r for w in outcome.wire for r in w.rcpt_tos) == sorted(case.recipients())
    hostile.one_named_address(outcome, "Cc" if case.cc else "To")


@pytest.mark.parametrize(("face", "case"), matrix(hostile.ONE_ENTRY_CASES, FACES))
def test_one_list_entry_holding_several_addresses_is_refused(env, face, case):
    """Django's own SMTP backend refuses these (sanitize_address / prep_address)."""
    check(face, case, env)


def test_two_entries_are_two_recipients(env):
    outcome = check("django", Case("two", to=["a@example.com", "b@example.com"]), env)
    assert isinstance(outcome, hostile.Delivered)
    assert sorted(r for w in outcome.wire for r in w.rcpt_tos) == ["a@example.com", "b@example.com"]


def test_bcc_is_delivered_and_not_written(env):
    outcome = check("django", Case("bcc", bcc=["hidden@example.org"]), env)
    assert isinstance(outcome, hostile.Delivered)
    assert sorted(r for w in outcome.wire for r in w.rcpt_tos) == [ANA, "hidden@example.org"]


@pytest.mark.parametrize(("face", "case"), matrix(hostile.NAME_AND_NUL_CASES, FACES))
def test_bad_header_names_and_control_characters_are_refused(env, face, case):
    check(face, case, env)


@pytest.mark.timeout(20)  # refusing takes milliseconds; a quadratic fold runs into this
@pytest.mark.parametrize(("face", "case"), matrix(hostile.BIG_CASES, FACES))
def test_huge_inputs_are_refused(env, face, case):
    check(face, case, env)


@pytest.mark.parametrize(("face", "case"), matrix(hostile.RAW_EXCEPTION_CASES, FACES))
def test_bad_input_is_a_refusal_never_a_raw_exception(env, face, case):
    check(face, case, env)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Mailqueue-Send-At", "5"),
        ("X-Mailqueue-Metadata", '{"a": ' * 10_000 + "1" + "}" * 10_000),
        ("X-Mailqueue-Metadata", "[1, 2]"),
    ],
    ids=["send-at-5", "metadata-depth-10000", "metadata-list"],
)
def test_option_headers_with_bad_values_are_refused(env, header, value):
    check("django", Case(f"option-{header}", headers=[(header, value)], refuse=True), env)
