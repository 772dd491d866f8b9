"""The deployment files: compose, Dockerfile, systemd units, alert rules, dashboard.

No Docker engine, Prometheus or Grafana runs here, so these check what can be
checked offline: the files parse, follow their schema, and every command,
environment variable and metric they name exists in the code.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from mailqueue import metrics
from mailqueue.cli import cli

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _check_mailqueue_command(argv: list[str], where: str) -> None:
    """``mailqueue SUB ARGS``: SUB exists and click accepts ARGS (without running it)."""
    assert argv[0].endswith("mailqueue"), f"{where}: {argv}"
    sub, args = argv[1], argv[2:]
    assert sub in cli.commands, f"{where}: no `mailqueue {sub}` command"
    try:
        cli.commands[sub].make_context(sub, list(args))
    except click.exceptions.Exit:  # --help and the like
        pass
    except click.UsageError as exc:
        raise AssertionError(f"{where}: `mailqueue {sub}` refuses {args}: {exc}") from None


def _env_names_in_code() -> set[str]:
    names = set()
    for path in (ROOT / "mailqueue").rglob("*.py"):
        names |= set(re.findall(r"MAILQUEUE_[A-Z0-9_]+", path.read_text()))
    return names


def test_compose_file_follows_the_schema_and_runs_real_commands():
    data = _compose()
    schema = json.loads((ROOT / "tests/data/compose-subset.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(data, schema)

    services = data["services"]
    assert {"postgres", "redis", "migrate", "worker", "scheduler", "web", "mailcatcher"} <= set(
        services
    )
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        command = svc.get("command")
        if isinstance(command, list) and command[0] == "mailqueue":
            _check_mailqueue_command(command, f"service {name}")
        if svc.get("build"):
            assert command, f"service {name} runs the image's default (--help)"

    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["migrate"]["restart"] == "no"
    for role in ("worker", "scheduler", "web"):
        deps = services[role]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    # the page is not published beyond the host, and it needs a token
    assert all(p.startswith("127.0.0.1:") for p in services["web"]["ports"])
    assert "MAILQUEUE_WEB_TOKEN" in services["web"]["environment"]
    assert "--no-auth-on-loopback" not in services["web"]["command"]
    # images are pinned, never "latest"
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name


def test_compose_environment_names_exist_in_the_code():
    known = _env_names_in_code()
    for name, svc in _compose()["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith("MAILQUEUE_"):
                assert key in known, f"service {name} sets {key}, which nothing reads"


def test_compose_schema_catches_mistakes():
    schema = json.loads((ROOT / "tests/data/compose-subset.schema.json").read_text())
    bad = _compose()
    bad["services"]["worker"]["deploy"]["replica"] = 3  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = _compose()
    bad["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_done"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_dockerfile_installs_the_extras_and_ignores_local_state():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'pip install "\.\[[^\]]*postgres[^\]]*\]"', text)
    assert re.search(r'pip install "\.\[[^\]]*web[^\]]*\]"', text)
    assert "COPY migrations" in text and "USER mailqueue" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd == ["mailqueue", "--help"]  # every compose service names its own command
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "*.db" in ignored


@pytest.mark.parametrize(
    "unit",
    ["mailqueue-worker@.service", "mailqueue-scheduler.service", "mailqueue-web.service"],
)
def test_systemd_units_parse_and_start_real_commands(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string((OPS / "systemd" / unit).read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    service = parser["Service"]
    assert service["User"] == "mailqueue" and service["Restart"] == "always"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    _check_mailqueue_command(shlex.split(service["ExecStart"]), unit)
    if "web" in unit:
        assert "--no-auth-on-loopback" not in service["ExecStart"]
        assert "127.0.0.1" in service["ExecStart"]


def _metric_names() -> set[str]:
    """Every series name mailqueue exports (with the _total/_bucket/... suffixes)."""
    names = set()
    for value in vars(metrics.get()).values():
        describe = getattr(value, "describe", None)
        if describe is None:
            continue
        for family in describe():
            base = family.name
            names |= {base, f"{base}_total", f"{base}_created"}
            if family.type == "histogram":
                names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return names


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\bmailqueue_[a-z_]+\b", expr))


def test_alert_rules_parse_name_real_metrics_and_have_a_runbook_entry():
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    runbook = (OPS / "RUNBOOK.md").read_text()
    headings = set(re.findall(r"^## (\w+)$", runbook, re.M))
    exported = _metric_names()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    names = {a["alert"] for a in alerts}
    # the four the issue asks for, at least
    assert {
        "MailqueueQueueAge",
        "MailqueueFailureRate",
        "MailqueueRelayPaused",
        "MailqueueNoWorker",
    } <= names
    for alert in alerts:
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"\d+[smh]", alert["for"])
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}
        assert alert["annotations"]["summary"]
        anchor = alert["annotations"]["runbook_url"].split("#")[1]
        assert anchor == alert["alert"].lower()
        assert alert["alert"] in headings, f"{alert['alert']} has no runbook section"
        used = _metrics_in(alert["expr"])
        assert used, alert["alert"]
        assert used <= exported, f"{alert['alert']} uses unknown {used - exported}"
        assert alert["expr"].count("(") == alert["expr"].count(")")


def test_prometheus_config_scrapes_the_ports_the_services_serve():
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    services = _compose()["services"]
    worker_port = int(services["worker"]["environment"]["MAILQUEUE_METRICS_PORT"])
    scheduler_port = int(services["scheduler"]["environment"]["MAILQUEUE_METRICS_PORT"])
    assert jobs["mailqueue-worker"]["dns_sd_configs"][0]["port"] == worker_port
    assert jobs["mailqueue-scheduler"]["static_configs"][0]["targets"] == [
        f"scheduler:{scheduler_port}"
    ]
    assert 'up{job="mailqueue-worker"}' in (OPS / "prometheus" / "alerts.yml").read_text()


def test_grafana_dashboard_queries_exported_metrics():
    dash = json.loads((OPS / "grafana" / "mailqueue-dashboard.json").read_text())
    exported = _metric_names()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    covered = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = _metrics_in(target["expr"])
            assert used and used <= exported, (panel["title"], used - exported)
            covered |= used
    # the dashboard shows every metric family the code exports
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in covered}
    assert families <= shown, f"not on the dashboard: {families - shown}"
