"""Configuration names and values: one known-name list, and mistakes that say what to do.

Every ``MAILQUEUE_*`` name the repository mentions is one mailqueue reads
(``config.KNOWN_NAMES``, the one list); any other is a ``ConfigError`` that
names the closest known one and where it was found. Values of the wrong
kind, a missing or broken TOML file and unknown relay options are
``ConfigError`` too, with the fix in the text and no password.
"""

from __future__ import annotations

import pickle
import re
import subprocess
from pathlib import Path

import pytest

from mailqueue.config import (
    KNOWN_NAMES,
    OTHER_NAMES,
    check_names,
    setting_sources,
    settings_from_env,
)
from mailqueue.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


MISSPELT_ON_PURPOSE = {
    "tests/test_config_names.py",
    "tests/test_config_frameworks.py",
    "tests/test_first_hour.py",
}
"""The tests of the refusal itself: they spell names wrong on purpose."""

EXAMPLE_MISTAKES = {"MAILQUEUE_RELAY_ULR", "MAILQUEUE_RELAY__X__COLOR"}
"""Wrong names shown on purpose: the README's example of the error, and the relay
option ``test_relays_tls_auth.py`` expects to be refused."""


def _repository_names() -> set[str]:
    files = subprocess.run(
        ["git", "ls-files", "mailqueue", "tests", "ops", "examples", "docs", "README.md",
         "docker-compose.yml", "Makefile", "Dockerfile", ".ci"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    names: set[str] = set()
    for file in files:
        if file in MISSPELT_ON_PURPOSE:
            continue
        path = ROOT / file
        if path.suffix in (".png", ".db", ".gz", ".ico") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        # A name ending in "_" is a prefix in prose or code ("MAILQUEUE_RELAY__<NAME>").
        names.update(n for n in re.findall(r"\bMAILQUEUE_[A-Z0-9_]*", text) if n[-1] != "_")
    return names


def test_every_name_the_repository_mentions_is_known():
    unknown = set()
    for name in _repository_names():
        if name in EXAMPLE_MISTAKES:
            continue
        try:
            check_names([name], "the repository")
        except ConfigError as exc:
            unknown.add(f"{name}: {exc}")
    assert not unknown, "add these to config.KNOWN_NAMES (or stop using them):\n" + "\n".join(
        sorted(unknown)
    )


def test_every_known_name_is_documented_in_the_docs():
    """The configuration reference moved from the README to docs/ (issue #19)."""
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    tools = {"MAILQUEUE_SCALE_ROWS", "MAILQUEUE_UPDATE_SCREENSHOT"}  # the tests' own knobs
    assert tools <= set(OTHER_NAMES)
    missing = sorted(n for n in KNOWN_NAMES - tools if n not in docs)
    assert not missing


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("MAILQUEUE_RELAY_ULR", "MAILQUEUE_RELAY_URL"),
        ("MAILQUEUE_DATABSE_URL", "MAILQUEUE_DATABASE_URL"),
        ("MAILQUEUE_BROKER", "MAILQUEUE_BROKER_URL"),
        ("MAILQUEUE_POOL_SIZ", "MAILQUEUE_POOL_SIZE"),
        ("MAILQUEUE_LOGJSON", "MAILQUEUE_LOG_JSON"),
        ("MAILQUEUE_DJANGO_SAME_DB", "MAILQUEUE_DJANGO_SAME_DATABASE"),
        ("MAILQUEUE_RELAY__BULK__POOLSIZE", "MAILQUEUE_RELAY__BULK__POOL_SIZE"),
        ("MAILQUEUE_RELAY__BULK__UR", "MAILQUEUE_RELAY__BULK__URL"),
    ],
)
def test_an_unknown_name_in_the_environment_names_the_closest_known_one(name, suggestion):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: "smtp://x:25"})
    error = caught.value
    assert (error.name, error.suggestion, error.source) == (name, suggestion, "environment")
    assert f"did you mean {suggestion}?" in str(error)
    assert isinstance(error, ValueError)


def test_an_unknown_name_far_from_any_points_at_the_reference():
    with pytest.raises(ConfigError, match="docs/configuration.md lists every name") as caught:
        settings_from_env({"MAILQUEUE_XYZZY": "1"})
    assert caught.value.suggestion is None


def test_a_relay_option_far_from_any_lists_the_options():
    with pytest.raises(ConfigError, match="unknown option 'color' of relay 'x'.*pool_size"):
        settings_from_env({"MAILQUEUE_RELAY__X__COLOR": "red"})
    with pytest.raises(ConfigError, match="MAILQUEUE_RELAY__<NAME>__<OPTION>"):
        settings_from_env({"MAILQUEUE_RELAY__BULK": "smtp://x"})


def test_names_for_tests_and_benchmarks_and_every_known_name_pass():
    environ = {n: "" for n in KNOWN_NAMES}
    environ.update(
        MAILQUEUE_TEST_ANYTHING="1",
        MAILQUEUE_BENCH_WHATEVER="1",
        MAILQUEUE_RELAY__BULK__URL="smtp://bulk.example.net:2525",
        MAILQUEUE_RELAY__BULK__POOL_SIZE="3",
        OTHER_APP_VARIABLE="x",
    )
    settings = settings_from_env(environ)
    assert settings.relay_named("bulk").pool_size == 3


def test_config_error_pickles_with_its_fields():
    error = ConfigError("bad", name="MAILQUEUE_X", suggestion="MAILQUEUE_Y", source="Flask config")
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), str(again), again.name, again.suggestion, again.source) == (
        ConfigError,
        "bad",
        "MAILQUEUE_X",
        "MAILQUEUE_Y",
        "Flask config",
    )


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"MAILQUEUE_POOL_SIZE": "five"}, "MAILQUEUE_POOL_SIZE='five' is not a whole number"),
        ({"MAILQUEUE_RETRY_BASE_S": "5m"}, "MAILQUEUE_RETRY_BASE_S='5m' is not a number"),
        ({"MAILQUEUE_RELAY__B__URL": "smtp://b", "MAILQUEUE_RELAY__B__TLS_VERIFY": "maybe"},
         "relay 'b': tls_verify='maybe' is not true or false"),
        ({"MAILQUEUE_RELAY_URL": "http://user:hunter2@mail.example.com"},
         "must start with smtp:// or smtps://, not http://"),
        ({"MAILQUEUE_DISPATCH": "later"}, "MAILQUEUE_DISPATCH must be 'background' or 'inline'"),
    ],
)  # fmt: skip
def test_wrong_values_are_config_errors_that_say_which(environ, words):
    with pytest.raises(ConfigError) as caught:
        settings_from_env(environ)
    assert words in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_the_config_file_missing_broken_or_misspelt(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read the file .*unset MAILQUEUE_CONFIG"):
        settings_from_env({"MAILQUEUE_CONFIG": str(missing)})
    broken = tmp_path / "broken.toml"
    broken.write_text("[mailqueue\n")
    with pytest.raises(ConfigError, match="is not valid TOML: .*line 1"):
        settings_from_env({"MAILQUEUE_CONFIG": str(broken)})
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text('[mailqueue]\ndatabase_ulr = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError, match="unknown setting 'database_ulr'.*database_url\\?"):
        settings_from_env({"MAILQUEUE_CONFIG": str(misspelt)})
    table = tmp_path / "table.toml"
    table.write_text('[relais.bulk]\nurl = "smtp://b"\n')
    with pytest.raises(ConfigError, match=r"unknown table \[relais\]; did you mean \[relays\]"):
        settings_from_env({"MAILQUEUE_CONFIG": str(table)})
    option = tmp_path / "option.toml"
    option.write_text('[relays.bulk]\nurl = "smtp://b"\npool_sise = 3\n')
    with pytest.raises(ConfigError, match="unknown option.*pool_sise.*did you mean pool_size"):
        settings_from_env({"MAILQUEUE_CONFIG": str(option)})
    number = tmp_path / "number.toml"
    number.write_text('[mailqueue]\nbatch_size = "many"\n')
    with pytest.raises(ConfigError, match="batch_size='many' is not a whole number"):
        settings_from_env({"MAILQUEUE_CONFIG": str(number)})


def test_a_number_written_as_text_in_the_config_file_is_read_as_a_number(tmp_path):
    path = tmp_path / "mq.toml"
    path.write_text('[mailqueue]\nbatch_size = "50"\nretry_base_s = "60"\n')
    settings = settings_from_env({"MAILQUEUE_CONFIG": str(path)})
    assert (settings.batch_size, settings.retry_base_s) == (50, 60.0)


def test_where_each_value_came_from(tmp_path):
    path = tmp_path / "mq.toml"
    path.write_text(
        '[mailqueue]\nbroker_url = "redis://127.0.0.1:6379/0"\n'
        '[relays.bulk]\nurl = "smtp://bulk.example.net"\n'
    )
    sources = setting_sources(
        {
            "MAILQUEUE_CONFIG": str(path),
            "MAILQUEUE_DATABASE_URL": "postgresql://app@db/app",
            "MAILQUEUE_RELAY__SES__URL": "smtp://ses.example.net:587",
        }
    )
    assert sources == {
        "database": "environment",
        "broker": f"file {path}",
        "relay default": "default",
        "relay bulk": f"file {path}",
        "relay ses": "environment",
    }
