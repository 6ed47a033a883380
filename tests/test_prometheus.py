"""The Grafana dashboard and the alerting rules against a real Prometheus scraping a real daemon.

Every query of ``config/grafana/monitor.json`` and ``config/prometheus-rules.yml``
must not only parse: it must return samples from the daemon's real series.
Needs the Debian package ``prometheus`` (``prometheus`` and ``promtool``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, base_config, free_port, wait_until

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "config" / "grafana" / "monitor.json"
RULES = ROOT / "config" / "prometheus-rules.yml"
EXAMPLE_CONFIG = ROOT / "config" / "prometheus.yml"
#: What the test puts in for Grafana's variables: every camera, and a rate window
#: that holds many 1 s scrapes yet still reaches back before the first event.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$camera": ".*"}
SCRAPE_INTERVAL = "1s"
#: Operators that turn a rule's series into a condition; a healthy daemon makes it false.
CONDITION_OPERATOR = re.compile(r"\s+(?:==|!=|>=|<=|>|<|and|or|unless)\s+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package prometheus): run scripts/setup")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target, rows' nested panels included."""
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            queries.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return queries


def template_variable(name: str) -> dict[str, Any]:
    (variable,) = (v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == name)
    return dict(variable)


#: A metric selector in PromQL: a name and its label matchers, if any.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\{[^}]*\})?")


def selectors(expr: str) -> list[tuple[str, str]]:
    """``(metric, matchers)`` of every selector in ``expr``; ``matchers`` without the braces."""
    return [(name, (braces or "{}")[1:-1]) for name, braces in SELECTOR.findall(expr)]


def check_the_camera_variable(prometheus: PrometheusServer, cameras: set[str]) -> None:
    """The ``camera`` variable lists the daemon's cameras, and every per-camera query filters on it."""
    variable = template_variable("camera")
    assert (variable["includeAll"], variable["multi"]) == (True, True), variable
    assert variable["allValue"] == GRAFANA_VARIABLES["$camera"], "the test's All is not the dashboard's"
    query = variable["query"]["query"]
    assert variable["definition"] == query
    found = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
    assert found, f"an unexpected camera variable query: {query}"
    metric, label = found.groups()
    # What Grafana's Prometheus data source asks for label_values(metric, label).
    answer = prometheus.api(f"label/{label}/values", **{"match[]": metric})
    assert answer["status"] == "success", answer
    assert sorted(answer["data"]) == sorted(cameras), (query, answer["data"])

    # Every series that has a camera label (as the daemon really exports them) is filtered by the
    # variable, the way a multi-value variable with All works: a regex match.
    per_camera = {s["__name__"] for s in prometheus.api("series", **{"match[]": '{camera!=""}'})["data"]}
    assert {"monitor_camera_up", "monitor_events_total"} <= per_camera, per_camera
    unfiltered = [
        (title, expr)
        for title, expr in dashboard_queries()
        for name, matchers in selectors(expr)
        if name in per_camera and 'camera=~"$camera"' not in matchers
    ]
    assert not unfiltered, f"per-camera series the camera variable does not filter: {unfiltered}"
    camera_matchers = [
        m for _, expr in dashboard_queries() for m in re.findall(r"camera\s*!?[=~]+[^,}]*", expr)
    ]
    assert camera_matchers, "no panel filters on the camera variable"
    assert set(camera_matchers) == {'camera=~"$camera"'}, camera_matchers

    # Choosing one camera narrows each per-camera panel to it; one nobody has empties it.
    for title, expr in dashboard_queries():
        if "$camera" not in expr:
            continue
        for choice, allowed in (("cam1", {"cam1"}), ("no-such-camera", set())):
            result = prometheus.api("query", query=as_grafana_would(expr.replace("$camera", choice)))
            assert result["status"] == "success", (title, expr, result)
            shown = {s["metric"].get("camera", choice) for s in result["data"]["result"]}
            assert shown <= allowed, (title, choice, result["data"]["result"])
            if allowed:
                assert result["data"]["result"], f"panel {title!r} shows nothing for {choice}: {expr}"


def rule_queries() -> list[tuple[str, str]]:
    """``(alert name, expr)`` of every rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def as_grafana_would(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def condition_operands(expr: str) -> list[str]:
    """The series a condition compares: ``a > 2 and absent(b)`` gives ``a`` and ``b``.

    Splits at comparison and set operators outside brackets and quotes, drops
    number literals and unwraps ``absent(...)``.
    """
    parts, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := CONDITION_OPERATOR.match(expr, i)):
            parts.append(expr[start:i])
            start = i = match.end()
            continue
        i += 1
    parts.append(expr[start:])
    operands = []
    for part in (p.strip() for p in parts):
        if re.fullmatch(r"[0-9.]+", part):
            continue
        absent = re.fullmatch(r"absent\((.*)\)", part, re.DOTALL)
        operands.append(absent.group(1) if absent else part)
    return operands


@dataclass
class PrometheusServer:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON answer of ``/api/v1/<path>``, errors (HTTP 400, 422) included."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        return body

    def values(self, expr: str) -> list[float]:
        """The sample values of an instant query that must succeed."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return [float(s["value"][1]) for s in answer["data"]["result"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], PrometheusServer]]:
    """Start a real Prometheus scraping ``127.0.0.1:<port>`` every second with our rules loaded."""
    started: list[PrometheusServer] = []

    def start(target_port: int) -> PrometheusServer:
        config = {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "monitor", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = tmp_path / "prometheus.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(port, proc, log_path)
        started.append(server)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{server.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, 30, "Prometheus's /-/ready", interval=0.2)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def test_promtool_accepts_the_rules_and_the_example_config():
    for args in (["check", "rules", str(RULES)], ["check", "config", str(EXAMPLE_CONFIG)]):
        done = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_alert_rules_fire_after_their_for_duration_and_only_on_their_condition(tmp_path):
    # Annotations are left out: promtool compares them verbatim, and `check rules`
    # already parses their templates.
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    a = {"job": "monitor", "instance": "a:8080"}
    b = {"job": "monitor", "instance": "b:8080"}

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{body}}}", "values": values}

    def alert(name: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
        severity = "critical" if name.startswith(("MonitorDown", "MonitorAbsent")) else "warning"
        expected = [{"exp_labels": {**x, "severity": severity}} for x in labels]
        return {"eval_time": at, "alertname": name, "exp_alerts": expected}

    # a is slow (every alert between 2 and 3 s), b fast (all under 0.1 s).
    latency = [
        series("monitor_alert_latency_seconds_bucket", {**a, "le": "2.0"}, "0+1x20"),
        series("monitor_alert_latency_seconds_bucket", {**a, "le": "3.0"}, "0+100x20"),
        series("monitor_alert_latency_seconds_bucket", {**a, "le": "+Inf"}, "0+100x20"),
        *(
            series("monitor_alert_latency_seconds_bucket", {**b, "le": le}, "0+100x20")
            for le in ("2.0", "+Inf")
        ),
    ]
    unit_tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("up", a, "1 0x30"),
                    series("up", b, "1x30"),
                    # cam1 goes down; cam2 stays up; cam3 is enabled: false, so never up.
                    series("monitor_camera_up", {**a, "camera": "cam1"}, "1 0x30"),
                    series("monitor_camera_up", {**a, "camera": "cam2"}, "1x30"),
                    series("monitor_camera_up", {**a, "camera": "cam3"}, "0x30"),
                    *(series("monitor_camera_enabled", {**a, "camera": c}, "1x30") for c in ("cam1", "cam2")),
                    series("monitor_camera_enabled", {**a, "camera": "cam3"}, "0x30"),
                    *latency,
                    # a grows while the broker is away; b holds a steady backlog.
                    series("monitor_spool_pending", a, "0+5x30"),
                    series("monitor_spool_pending", b, "3x30"),
                    # a's disk fills up at 5m and is freed at 9m; b's spool is never degraded.
                    series("monitor_spool_degraded", a, "0x4 1x4 0x21"),
                    series("monitor_spool_degraded", b, "0x30"),
                ],
                "alert_rule_test": [
                    alert("MonitorDown", "2m"),
                    alert("MonitorDown", "3m", a),
                    alert("MonitorAbsent", "10m"),
                    alert("MonitorCameraDown", "2m"),
                    alert("MonitorCameraDown", "3m", {**a, "camera": "cam1"}),
                    alert("MonitorCameraDown", "20m", {**a, "camera": "cam1"}),
                    alert("MonitorAlertLatencyHigh", "5m"),
                    alert("MonitorAlertLatencyHigh", "7m", a),
                    alert("MonitorSpoolGrowing", "10m"),
                    alert("MonitorSpoolGrowing", "12m", a),
                    alert("MonitorSpoolDegraded", "6m"),
                    alert("MonitorSpoolDegraded", "7m", a),
                    alert("MonitorSpoolDegraded", "10m"),
                ],
            },
            {
                "interval": "1m",
                "input_series": [series("monitor_ready", a, "1x5")],
                "alert_rule_test": [
                    alert("MonitorAbsent", "1m"),
                    alert("MonitorAbsent", "3m", {"job": "monitor"}),
                ],
            },
        ],
    }
    (tmp_path / "rules-test.yml").write_text(yaml.safe_dump(unit_tests))
    done = subprocess.run(
        [tool("promtool"), "test", "rules", "rules-test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"


def test_every_dashboard_and_rule_query_returns_the_daemons_series(
    weights, tmp_path, broker, rtsp_server, daemon_factory, prometheus_factory
):
    http_port = free_port()
    # Prometheus first: it then has samples from before the first event, so rates
    # of the alert-latency histogram over 30 s see that event.
    prometheus = prometheus_factory(http_port)
    cameras = {
        "cam1": {"url": rtsp_server.url("cam1")},
        "off": {"url": rtsp_server.url("off"), "enabled": False},
    }
    config = base_config(weights, tmp_path, broker.port, http_port, cameras=cameras)
    daemon = daemon_factory(config)

    wait_until(lambda: prometheus.values('up{job="monitor"}') == [1], 30, "Prometheus to scrape the daemon")
    wait_until(
        lambda: (
            max(prometheus.values('count_over_time(monitor_events_total{type="new"}[1m])'), default=0) >= 2
        ),
        60,
        "two scrapes after the first new event",
    )

    def rules_evaluated() -> bool:
        groups = prometheus.api("rules")["data"]["groups"]
        return bool(groups) and all(r["health"] == "ok" for g in groups for r in g["rules"])

    wait_until(rules_evaluated, 10, "every rule evaluated without error")

    failures = []

    def check_returns_samples(where: str, expr: str) -> None:
        answer = prometheus.api("query", query=expr)
        if answer["status"] != "success":
            failures.append(f"{where}: {expr}\n    {answer.get('errorType')}: {answer.get('error')}")
            return
        values = [float(s["value"][1]) for s in answer["data"]["result"]]
        if not any(math.isfinite(v) for v in values):
            failures.append(f"{where}: {expr}\n    no finite sample: {answer['data']['result']}")

    for title, expr in dashboard_queries():
        check_returns_samples(f"panel {title!r}", as_grafana_would(expr))
    for name, expr in rule_queries():
        # The condition is false on a healthy daemon: it must parse, and what it compares must exist.
        answer = prometheus.api("query", query=expr)
        if answer["status"] != "success":
            failures.append(f"rule {name}: {expr}\n    {answer.get('errorType')}: {answer.get('error')}")
        for operand in condition_operands(expr):
            check_returns_samples(f"rule {name}, operand", operand)
    assert not failures, "queries that do not return the daemon's series:\n" + "\n".join(failures)

    # Tracks end and their `end` events are delivered, yet alert latency stays the daemon's
    # own delay: the p99 rule's condition stays false (it used to count max_disappeared, 2 s,
    # into every `end`, which paged on a healthy daemon).
    wait_until(
        lambda: max(prometheus.values('sum(monitor_events_total{type="end"})'), default=0) >= 1,
        120,
        "Prometheus to see an end event",
    )
    seen_at = time.time()  # the end's PUBACK follows within milliseconds: one more scrape has it
    wait_until(
        lambda: max(prometheus.values('timestamp(monitor_ready{job="monitor"})'), default=0) > seen_at + 0.5,
        30,
        "a scrape after the end event",
    )
    (latency_high,) = (expr for name, expr in rule_queries() if name == "MonitorAlertLatencyHigh")
    assert prometheus.api("query", query=latency_high)["data"]["result"] == []
    p99 = prometheus.values(
        "histogram_quantile(0.99, sum by (le) "
        '(rate(monitor_alert_latency_seconds_bucket{job="monitor"}[5m])))'
    )
    assert p99, "the latency histogram has the end events' samples"
    assert p99[0] < 2.0, p99

    # A disabled camera is never up, yet MonitorCameraDown's condition leaves it out.
    assert prometheus.values('monitor_camera_up{camera="off"}') == [0]
    (camera_down,) = (expr for name, expr in rule_queries() if name == "MonitorCameraDown")
    down = prometheus.api("query", query=camera_down)["data"]["result"]
    assert "off" not in {s["metric"]["camera"] for s in down}

    # The dashboard shows every family the daemon exports.
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=5) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    used = set(re.findall(r"\b[a-z_]+\b", " ".join(expr for _, expr in dashboard_queries())))
    # The text format's `_created` samples parse as families of their own: not ours to chart;
    # of the standard process_* families the dashboard charts RSS and CPU only.
    missing = [
        f.name
        for f in families
        if not f.name.endswith("_created")
        and not f.name.startswith("process_")
        # A labelled family with no series yet (clip failures of a camera that never failed) by its name.
        and not ({s.name for s in f.samples} or {f.name, f"{f.name}_total"}) & used
    ]
    assert not missing, f"families without a panel in {DASHBOARD.name}: {missing}"

    check_the_camera_variable(prometheus, set(cameras))
