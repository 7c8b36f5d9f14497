"""promtool accepts the scrape configurations and the rules, and the rules' unit tests pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_support import PROMTOOL

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
STATIC_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
KUBERNETES_CONFIG = PROMETHEUS_DIR / "prometheus-kubernetes.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"

pytestmark = pytest.mark.skipif(
    not PROMTOOL.exists(), reason="promtool is absent (apt-get install prometheus)"
)


def _promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PROMTOOL), *map(str, args)], capture_output=True, text=True, cwd=PROMETHEUS_DIR
    )


def _assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def _kubernetes_sd_available() -> bool:
    """Debian's Prometheus is built without Kubernetes service discovery."""
    probe = _promtool("check", "config", KUBERNETES_CONFIG)
    return "kubernetes_sd_configs not found" not in probe.stdout + probe.stderr


def test_static_scrape_config_is_valid():
    _assert_ok(_promtool("check", "config", STATIC_CONFIG))
    config = yaml.safe_load(STATIC_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"gradprobe", "torchserve"}
    assert jobs["gradprobe"]["static_configs"][0]["targets"][0].endswith(":9464")
    assert jobs["torchserve"]["static_configs"][0]["targets"][0].endswith(":8082")
    assert config["rule_files"] == ["rules.yml"]


def test_kubernetes_scrape_config_is_valid(tmp_path):
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"gradprobe", "torchserve"}
    for job in jobs.values():
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert config["rule_files"] == ["rules.yml"]
    if _kubernetes_sd_available():
        _assert_ok(_promtool("check", "config", KUBERNETES_CONFIG))
        return
    # Without Kubernetes discovery in this promtool, check everything else: the same jobs and
    # relabelling with file discovery instead (tests/deploy/test_dashboard_queries.py runs
    # the relabelling on emulated pod targets in a real Prometheus).
    for job in jobs.values():
        job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
        del job["kubernetes_sd_configs"]
    config["rule_files"] = [str(RULES)]
    substitute = tmp_path / "prometheus.yml"
    substitute.write_text(yaml.safe_dump(config, sort_keys=False))
    _assert_ok(_promtool("check", "config", substitute))


def test_rules_are_valid():
    _assert_ok(_promtool("check", "rules", RULES))


def test_rules_unit_tests_pass():
    _assert_ok(_promtool("test", "rules", RULES_TEST))


def test_every_alert_is_unit_tested_and_documented():
    """Each alert has a case where it fires and one where it does not, a `for:`, a severity
    and annotations an on-call engineer can act on."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert set(alerts) <= fired, f"never shown firing in rules_test.yml: {set(alerts) - fired}"
    assert set(alerts) <= quiet, f"never shown quiet in rules_test.yml: {set(alerts) - quiet}"
    for name, rule in alerts.items():
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"].split()) >= 15, name
