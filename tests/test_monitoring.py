"""docs/monitoring.md, as an operator copies it: its alert rules pass ``promtool check rules`` and
fire, over made-up series replayed by ``promtool test rules``, exactly when a domain has had no
successful backup for 26 hours; a real agent's /metrics passes ``promtool check metrics``."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_notify import NotifySocket, start

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "monitoring.md"
BIN = Path(sys.executable).parent

# Prometheus' unit-test format: series sampled every minute from t=0 (a sample older than 5 minutes is
# gone for an instant query, as in a real server); alerts evaluated at 25 h and 27 h.
# web: backed up once, at t=0 (value 0 s), then never again -> fires at 26 h 10 m
# db: backed up every hour (the value follows the clock) -> never fires
# restarted: backed up at t=0, its agent restarted at 10 h and shows no value since -> still fires
# new: served for 27 h, never backed up -> HyperbackNeverBackedUp
RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'hyperback_last_success_timestamp_seconds{job="hyperback", instance="a", domain="web"}'
        values: '0x1800'
      - series: 'hyperback_last_success_timestamp_seconds{job="hyperback", instance="a", domain="db"}'
        values: '0+60x1800'
      - series: 'hyperback_last_success_timestamp_seconds{job="hyperback", instance="a", domain="restarted"}'
        values: '0x600'
      - series: 'hyperback_domain_served{job="hyperback", instance="a", domain="web"}'
        values: '1x1800'
      - series: 'hyperback_domain_served{job="hyperback", instance="a", domain="db"}'
        values: '1x1800'
      - series: 'hyperback_domain_served{job="hyperback", instance="a", domain="restarted"}'
        values: '1x1800'
      - series: 'hyperback_domain_served{job="hyperback", instance="a", domain="new"}'
        values: '1x1800'
      - series: 'up{job="hyperback", instance="a"}'
        values: '1x1800'
    alert_rule_test:
      - eval_time: 25h
        alertname: HyperbackNoRecentBackup
        exp_alerts: []
      - eval_time: 27h
        alertname: HyperbackNoRecentBackup
        exp_alerts:
          - exp_labels: {severity: page, domain: restarted}
            exp_annotations:
              summary: "no successful backup of restarted for 26 h"
              description: "the newest successful backup of restarted is 1d 3h 0m 0s old"
          - exp_labels: {severity: page, domain: web}
            exp_annotations:
              summary: "no successful backup of web for 26 h"
              description: "the newest successful backup of web is 1d 3h 0m 0s old"
      - eval_time: 25h
        alertname: HyperbackNeverBackedUp
        exp_alerts: []
      - eval_time: 27h
        alertname: HyperbackNeverBackedUp
        exp_alerts:
          - exp_labels: {severity: page, domain: new}
            exp_annotations:
              summary: "no successful backup of new in 26 h of serving it"
      - eval_time: 27h
        alertname: HyperbackAgentDown
        exp_alerts: []
"""


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(BIN))
    if found is None:
        pytest.fail("promtool is missing: .ci/setup unpacks it from Debian's prometheus package "
                    "into .venv/bin")
    return found


def doc_block(heading: str) -> str:
    """The first yaml block under ``heading`` in docs/monitoring.md."""
    section = DOC.read_text().split(f"## {heading}\n", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, heading
    return match.group(1)


def test_the_documented_alert_rules_are_valid(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(doc_block("Alert rules"))
    done = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_fires_after_26_hours_without_a_successful_backup(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(doc_block("Alert rules"))
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    done = subprocess.run([promtool(), "test", "rules", "tests.yml"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_documented_scrape_config_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(doc_block("Scrape configuration"))
    done = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_running_agents_metrics_pass_promtool(tmp_path: Path) -> None:
    """The installed agent on libvirt's test driver: READY's status names the metrics address."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    config = tmp_path / "agent.toml"
    config.write_text(f"""
libvirt_uri = "test:///default"
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
optimizer = "unix:{tmp_path}/optimizer.sock"
operator_listen = "unix:{tmp_path}/agent.sock"
metrics_listen = "127.0.0.1:0"
[repositories]
default = "{tmp_path}/repo"
""")
    proc = start([str(BIN / "hyperback-agent"), "--config", str(config), "--with-optimizer"], notify,
                 tmp_path / "agent.log")
    try:
        ready = notify.until(lambda lines: "READY=1" in lines)
        match = re.search(r"metrics on (http://\S+/metrics)", " ".join(ready))
        assert match, ready
        with urllib.request.urlopen(match.group(1), timeout=10) as response:
            body = response.read()
    finally:
        proc.terminate()
        proc.wait(60)
        notify.close()
    assert b"hyperback_queue_depth 0.0" in body
    assert b'hyperback_jobs_accepted_total{origin="guest"} 0.0' in body
    done = subprocess.run([promtool(), "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
