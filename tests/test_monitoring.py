"""The shipped alert rules under ``promtool`` and the Grafana dashboard against the metrics a
real worker serves: a renamed metric breaks here, not silently on an operator's screen."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pushfw.producer import Producer
from pushfw.producer.lists import ListContent
from pushfw.worker import Worker
from tests.conftest import RedisServer, need, wait_for
from tests.test_metrics import build, running, scrape, value

ROOT = Path(__file__).parent.parent
RULES = ROOT / "integrations" / "prometheus"
DASHBOARD = ROOT / "integrations" / "grafana" / "pushfw.json"
METRIC = re.compile(r"\b(?:pushfw|process)_[a-z_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(worker: Worker) -> set[str]:
    """Every series name ``/metrics`` declares, also for a labelled family without samples yet."""
    assert worker.metrics.address is not None
    host, port = worker.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_metrics() -> set[str]:
    """Metric names in the rules file (its prose names none: no YAML parser needed)."""
    text = (RULES / "pushfw-alerts.yml").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return set(METRIC.findall("\n".join(lines)))


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool (Debian package prometheus; scripts/install)")
    assert promtool is not None
    for args in (
        ["check", "rules", "pushfw-alerts.yml"],
        ["test", "rules", "pushfw-alerts.test.yml"],
    ):
        proc = subprocess.run(
            [promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout


def test_dashboard_and_alerts_query_what_a_real_worker_exports(
    r, redis_server: RedisServer, producer: Producer
):
    worker = build(redis_server)
    with running(worker):
        assert producer.wait(producer.drop("192.0.2.1"))
        assert producer.wait(producer.load_list("feed", ListContent.of(["192.0.2.0/28"])))
        wait_for(
            lambda: value(scrape(worker), "pushfw_list_entries", list="feed") == 1,
            what="the list at heartbeat",
        )
        names = exported(worker)
    panels = dashboard_queries()
    queried = {name for expr in panels for name in METRIC.findall(expr)}
    assert len(queried) >= 20, sorted(queried)
    assert queried - names == set(), "the dashboard queries what no worker exports"
    alerted = alert_metrics()
    assert len(alerted) >= 7, sorted(alerted)
    assert alerted - names == set(), "an alert reads what no worker exports"
    for wanted in ("pushfw_ledger_lost", "pushfw_problems", "process_resident_memory_bytes"):
        assert wanted in queried
    ours = {n for n in names if n.startswith("pushfw_") and not n.endswith(("_sum", "_count"))}
    assert ours - queried == set(), "a pushfw metric the dashboard does not show"
