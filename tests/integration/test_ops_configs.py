"""Deployment and operations files, checked by the tools that will read them in production.

* Prometheus configs: `promtool check config`; alert rules: `promtool check rules` and the
  `promtool test rules` unit tests in ops/prometheus/tests (and proof that those tests can fail).
* Grafana: the dashboard JSON loads, uses the provisioned datasource, and every PromQL expression
  in it parses (promtool parses them as recording rules); every `cms_*` metric that a dashboard
  or an alert names is one the code defines; every alert has a runbook section.
* Compose: `docker compose config` (or Debian's `docker-compose config`) on the example env,
  then the normalized file's shape: what makes `--scale ws_node=N` work, persistence, ports.
* The image's entrypoint and HEALTHCHECK script run for real: a node started by the entrypoint
  answers the health check; a gateway without a PBX is reported unhealthy.
* compose/haproxy/render_haproxy.py output passes `haproxy -c -dW`.

promtool and the compose client come from `scripts/setup-ops.sh`; missing tools fail the tests.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from balancer import RuntimeAPI, RuntimeAPIError
from balancer.haproxy_ctl import HAProxyNotFoundError, find_haproxy
from local_cluster.infra import Infrastructure

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
PROM = OPS / "prometheus"
COMPOSE = REPO / "compose"
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
SETUP_HINT = "install it with `bash scripts/setup-ops.sh` (Debian's prometheus package)"

# Grafana's built-in interval variables, replaced by a fixed window before PromQL parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

# Metrics other exporters define (HAProxy, RabbitMQ, redis_exporter, Prometheus itself).
FOREIGN_PREFIXES = ("haproxy_", "rabbitmq_", "redis_", "up", "process_", "python_")


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool not found on PATH: {SETUP_HINT}")
    return path


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) for every target of every dashboard."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append((f"{path.name}: {panel['title']}", expr))
    return found


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expression) read from alerts.yml (promtool validates the YAML itself)."""
    text = (PROM / "alerts.yml").read_text(encoding="utf-8")
    names = re.findall(r"^\s*- alert: (\S+)$", text, flags=re.M)
    exprs = re.findall(r"^\s*expr: (?:\|\n)?(.*?)(?=^\s*(?:for|labels):)", text, flags=re.M | re.S)
    assert len(names) == len(exprs), "every alert in alerts.yml needs an expr followed by for/labels"
    return list(zip(names, (" ".join(e.split()) for e in exprs), strict=True))


def defined_metrics() -> dict[str, str]:
    """Metric name -> type for every prometheus_client metric the project's processes define."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-z_:][a-z0-9_:]*)\"")
    metrics: dict[str, str] = {}
    for package in ("services", "ami_gateway", "ws_node", "ami_simulator"):
        for source in (REPO / package).rglob("*.py"):
            for kind, name in pattern.findall(source.read_text(encoding="utf-8")):
                metrics[name] = kind
    return metrics


def referenced_cms_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(cms_[a-z0-9_]+)", expr))


def base_metric(name: str, metrics: dict[str, str]) -> str | None:
    """The defined metric a sample name belongs to (`x_bucket` -> histogram `x`, `x_total` -> counter)."""
    if name in metrics:
        return name
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics:
            return name[: -len(suffix)]
    return None


# ---- Prometheus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-local.yml"])
def test_prometheus_config_passes_promtool(promtool: str, config: str) -> None:
    result = run([promtool, "check", "config", str(PROM / config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_both_configs_use_the_job_names_the_alerts_and_dashboard_expect() -> None:
    for config in ("prometheus.yml", "prometheus-local.yml"):
        jobs = set(re.findall(r"job_name: (\S+)", (PROM / config).read_text(encoding="utf-8")))
        assert {"cms-gateway", "cms-node", "haproxy"} <= jobs, (config, jobs)
    compose_jobs = set(re.findall(r"job_name: (\S+)", (PROM / "prometheus.yml").read_text(encoding="utf-8")))
    assert {"rabbitmq", "rabbitmq-queues", "redis"} <= compose_jobs


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    count = int(re.search(r"SUCCESS: (\d+) rules found", result.stdout).group(1))  # type: ignore[union-attr]
    assert count == len(alert_rules())


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = {name for name, _ in alert_rules()}
    required = {
        "CmsAmiDisconnected", "CmsNodeDown", "CmsEventLagHigh", "CmsCommandFailures",
        "CmsOutboxBacklog", "CmsCommandsBacklog", "CmsAmiReconnectStorm", "CmsBrokerReconnectStorm",
    }
    assert required <= names, required - names
    exprs = dict(alert_rules())
    assert "cms_ami_connected == 0" in exprs["CmsAmiDisconnected"]
    assert 'cms_commands_total{outcome="error"}' in exprs["CmsCommandFailures"]
    assert "cms_end_to_end_latency_seconds_bucket" in exprs["CmsEventLagHigh"]


def test_alert_unit_tests_pass(promtool: str) -> None:
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests, "no promtool rule tests in ops/prometheus/tests"
    result = run([promtool, "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr
    text = (PROM / "tests" / "alerts_test.yml").read_text(encoding="utf-8")
    for alert in ("CmsAmiDisconnected", "CmsNodeDown"):
        assert f"alertname: {alert}" in text


def test_alert_unit_tests_fail_on_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    """The harness can fail: the same tests, with one expected label changed, must not pass."""
    text = (PROM / "tests" / "alerts_test.yml").read_text(encoding="utf-8")
    text = text.replace("../alerts.yml", str(PROM / "alerts.yml"))
    mutated = text.replace("exp_labels: {severity: warning, job: cms-node,",
                           "exp_labels: {severity: critical, job: cms-node,")
    assert mutated != text
    (tmp_path / "mutated_test.yml").write_text(mutated, encoding="utf-8")
    result = run([promtool, "test", "rules", str(tmp_path / "mutated_test.yml")])
    assert result.returncode != 0
    assert "CmsNodeDown" in result.stdout + result.stderr


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (OPS / "runbooks" / "alerts.md").read_text(encoding="utf-8")
    headings = {h.strip().lower() for h in re.findall(r"^#{2,3} (\S+)\s*$", runbook, flags=re.M)}
    text = (PROM / "alerts.yml").read_text(encoding="utf-8")
    anchors = set(re.findall(r"runbook: ops/runbooks/alerts\.md#(\S+)", text))
    for name, _ in alert_rules():
        assert name.lower() in anchors or name == "CmsEventLagCritical", f"{name} has no runbook annotation"
    missing = anchors - headings
    assert not missing, f"runbook anchors without a '## Name' heading in ops/runbooks/alerts.md: {missing}"


# ---- Grafana ------------------------------------------------------------------------------------


def test_dashboard_loads_and_uses_the_provisioned_datasource() -> None:
    assert DASHBOARDS, "no dashboard JSON in ops/grafana/dashboards"
    provisioning = (OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    uid = re.search(r"^\s*uid: (\S+)$", provisioning, flags=re.M).group(1)  # type: ignore[union-attr]
    assert "url: http://prometheus:9090" in provisioning
    dash_provider = (OPS / "grafana" / "provisioning" / "dashboards" / "cms.yml").read_text(encoding="utf-8")
    assert "path: /etc/grafana/dashboards" in dash_provider
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] and dashboard["title"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    titles = " | ".join(t for t, _ in dashboard_expressions()).lower()
    for wanted in ("calls in progress", "events per second", "end-to-end latency", "connected agents per node",
                   "reconnects", "command latency", "command errors"):
        assert wanted in titles, wanted


def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule; a PromQL error names the panel."""
    exprs = dashboard_expressions()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(exprs):
        lines += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nexpressions: {exprs}"
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_dashboards_and_alerts_name_only_metrics_the_code_defines() -> None:
    metrics = defined_metrics()
    assert "cms_ami_connected" in metrics and "cms_node_clients" in metrics, "metric scan found nothing"
    used = dashboard_expressions() + alert_rules()
    unknown = sorted(
        {(where, name) for where, expr in used for name in referenced_cms_metrics(expr)
         if base_metric(name, metrics) is None}
    )
    assert not unknown, f"expressions name metrics no process defines: {unknown}"
    for where, expr in used:
        for name in re.findall(r"\b(cms_[a-z0-9_]+)_bucket\b", expr):
            assert metrics.get(name) == "Histogram", f"{where}: {name}_bucket but {name} is not a histogram"


# ---- Compose ------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail(f"neither `docker compose` nor `docker-compose` is installed: {SETUP_HINT}")


def load_yaml(text: str) -> Any:
    """YAML -> Python, with PyYAML from the venv or else the system's (python3-yaml, setup-ops.sh)."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        converter = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
        result = run(["/usr/bin/python3", "-c", converter], input=text)
        if result.returncode != 0:
            pytest.fail(f"cannot read YAML: no PyYAML in the venv or /usr/bin/python3 ({SETUP_HINT}): {result.stderr}")
        return json.loads(result.stdout)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    result = run([*compose_command(), "--env-file", str(COMPOSE / ".env.example"),
                  "-f", str(COMPOSE / "docker-compose.yml"), "config"], cwd=COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    config: dict[str, Any] = load_yaml(result.stdout)
    return config


def volumes(config: dict[str, Any], service: str) -> list[dict[str, str]]:
    """Long-form volume entries; `docker-compose` 1.x prints the short `SOURCE:TARGET[:MODE]` form."""
    entries: list[dict[str, str]] = []
    for volume in config["services"][service].get("volumes", []):
        if isinstance(volume, dict):
            entries.append(volume)
            continue
        source, target = str(volume).split(":")[:2]
        kind = "bind" if source.startswith(("/", ".")) else "volume"
        entries.append({"type": kind, "source": source, "target": target})
    return entries


def test_compose_config_refuses_to_run_without_passwords(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("# nothing set\n", encoding="utf-8")
    result = run([*compose_command(), "--env-file", str(empty), "-f", str(COMPOSE / "docker-compose.yml"),
                  "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0
    assert "RABBITMQ_USER" in result.stdout + result.stderr or "RABBITMQ_PASSWORD" in result.stdout + result.stderr


def test_compose_services_and_persistence(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert {"rabbitmq", "redis", "gateway", "ws_node", "haproxy", "prometheus", "grafana"} <= set(services)
    assert "management" in services["rabbitmq"]["image"]
    assert services["rabbitmq"]["hostname"] == "rabbitmq"
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    for name in ("rabbitmq", "redis", "prometheus", "grafana"):
        assert any(v["type"] == "volume" for v in volumes(compose_config, name)), f"{name} keeps no data volume"
    for name in ("rabbitmq", "redis"):
        assert services[name]["healthcheck"]["test"], name
    # Every process Prometheus scrapes is reachable under the name prometheus.yml uses.
    prom = (PROM / "prometheus.yml").read_text(encoding="utf-8")
    for target in re.findall(r'"([a-z_]+):\d+"', prom):
        assert target in services or target == "localhost", target
    assert "ws-node" in services["ws_node"]["networks"]["default"]["aliases"]


def test_ws_node_can_scale(compose_config: dict[str, Any]) -> None:
    node = compose_config["services"]["ws_node"]
    assert "container_name" not in node and "ports" not in node, "a fixed name or host port prevents --scale"
    assert "hostname" not in node, "replicas need distinct hostnames (they become node ids)"
    assert int(node["deploy"]["replicas"]) >= 2
    assert node["command"] == ["node"]
    env = node["environment"]
    assert env["CMS_AMQP_URL"].startswith("amqp://cms:") and "@rabbitmq:5672/" in env["CMS_AMQP_URL"]
    assert env["CMS_REDIS_URL"].startswith("redis://:") and env["CMS_REDIS_URL"].endswith("@redis:6379/0")
    gateway = compose_config["services"]["gateway"]
    assert gateway["command"] == ["gateway"]
    assert int(gateway.get("deploy", {}).get("replicas", 1)) == 1, "exactly one gateway holds the AMI session"
    haproxy = compose_config["services"]["haproxy"]
    published = {int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1].split("/")[0])
                 for p in haproxy["ports"]}
    assert {2013, 2014, 8404} <= published
    assert haproxy["environment"]["CMS_NODE_DNS_NAME"] == "ws-node"


def test_compose_mounts_files_that_exist(compose_config: dict[str, Any]) -> None:
    user_provided = {COMPOSE / "appsettings.json": COMPOSE / "appsettings.example.json",
                     COMPOSE / "secrets": COMPOSE / "secrets" / "README.md"}
    for name in compose_config["services"]:
        for volume in volumes(compose_config, name):
            if volume["type"] != "bind":
                continue
            source = Path(volume["source"])
            if source in user_provided:
                assert user_provided[source].exists(), f"{name}: no example for {source}"
            else:
                assert source.exists(), f"{name} mounts {source}, which is not in the repository"


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    text = (COMPOSE / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim AS app$", text, flags=re.M)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] != "root" and users[-1].split(":")[0] != "0"
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", text, flags=re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' in text
    for copied in re.findall(r"^COPY (?:--\S+ )?(\S+)", text, flags=re.M):
        assert (REPO / copied).exists(), f"Dockerfile copies {copied}, which does not exist"
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for copied in re.findall(r"^COPY (?:--\S+ )?(\S+)", text, flags=re.M):
        assert f"!{copied}" in ignore or f"!{copied}/**" in ignore, f"{copied} is excluded from the build context"


# ---- entrypoint + healthcheck, for real ---------------------------------------------------------


def entrypoint_env(tmp_path: Path, settings: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMS_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        CMS_CONFIG=str(settings),
        CMS_RUN_DIR=str(tmp_path / "run"),
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthcheck(env: dict[str, str], want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    code = -1
    while time.monotonic() < deadline:
        code = run([sys.executable, str(COMPOSE / "healthcheck.py")], env=env).returncode
        if code == want:
            return code
        time.sleep(0.3)
    return code


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def test_entrypoint_node_role_passes_the_healthcheck(
    infra: Infrastructure, prefix: str, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps({"Cluster": {"prefix": prefix}}), encoding="utf-8")
    port = free_port()
    env = entrypoint_env(tmp_path, settings, CMS_NODE_PORT=str(port), CMS_AMQP_URL=infra.amqp_url,
                         CMS_REDIS_URL=infra.redis_url, CMS_DRAIN_SECONDS="1")
    assert run([sys.executable, str(COMPOSE / "healthcheck.py")], env=env).returncode == 1  # nothing started
    log = (tmp_path / "node.log").open("wb")
    with log:
        node = subprocess.Popen([str(COMPOSE / "docker-entrypoint.sh"), "node"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    spawned.append(node)
    assert wait_healthcheck(env, 0, 30) == 0, (tmp_path / "node.log").read_text(errors="replace")
    assert (tmp_path / "run" / "health-url").read_text().strip() == f"http://127.0.0.1:{port}/health"
    lines = (tmp_path / "node.log").read_text(errors="replace").splitlines()
    assert lines and all(line.startswith("{") for line in lines if line.strip()), "entrypoint asks for JSON logs"
    node.send_signal(signal.SIGTERM)  # the node drains and exits
    assert node.wait(timeout=20) == 0
    assert wait_healthcheck(env, 1, 5) == 1


def test_entrypoint_gateway_without_pbx_is_unhealthy(
    infra: Infrastructure, prefix: str, tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    example = json.loads((COMPOSE / "appsettings.example.json").read_text(encoding="utf-8"))
    example["Asterisk"].update(url="127.0.0.1", port=str(free_port()))  # nobody listens there
    example["Cluster"] = {"prefix": prefix}
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps(example), encoding="utf-8")
    port = free_port()
    env = entrypoint_env(tmp_path, settings, CMS_METRICS_PORT=str(port), CMS_AMQP_URL=infra.amqp_url,
                         CMS_REDIS_URL=infra.redis_url)
    log = (tmp_path / "gateway.log").open("wb")
    with log:
        gateway = subprocess.Popen([str(COMPOSE / "docker-entrypoint.sh"), "gateway"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    spawned.append(gateway)
    deadline = time.monotonic() + 20
    while not (tmp_path / "run" / "health-url").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # The metrics endpoint answers (503 while AMI is down), and the health check says unhealthy.
    import urllib.error

    status = 0
    while time.monotonic() < deadline and status == 0:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    assert status == 503, (tmp_path / "gateway.log").read_text(errors="replace")
    assert run([sys.executable, str(COMPOSE / "healthcheck.py")], env=env).returncode == 1
    assert "change-me-ami-secret" not in (tmp_path / "gateway.log").read_text(errors="replace")


# ---- HAProxy config of the compose deployment ---------------------------------------------------


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    try:
        return find_haproxy()
    except HAProxyNotFoundError as exc:
        pytest.fail(str(exc))


def render_compose_haproxy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CMS_")}
    full.update(PYTHONPATH=str(REPO), CMS_RUN_DIR=str(tmp_path / "run"), **env)
    return run([sys.executable, str(COMPOSE / "haproxy" / "render_haproxy.py"), "--out", str(tmp_path / "haproxy.cfg")],
               env=full)


def test_compose_haproxy_config_passes_haproxy_check(haproxy_bin: str, tmp_path: Path) -> None:
    cert = tmp_path / "cms.pem"
    made = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-days", "2", "-subj", "/CN=cms.example.com", "-keyout", str(tmp_path / "k.pem"),
                "-out", str(tmp_path / "c.pem")])
    assert made.returncode == 0, made.stderr
    cert.write_bytes((tmp_path / "c.pem").read_bytes() + (tmp_path / "k.pem").read_bytes())
    key_file = tmp_path / "deployment.key"
    key_file.write_text("c0ffee-2f9d8a77b1e04e0c\n", encoding="utf-8")
    result = render_compose_haproxy(tmp_path, CMS_TLS_CERT=str(cert), CMS_DEPLOYMENT_KEY_FILE=str(key_file),
                                    CMS_ALLOWED_ORIGINS="https://crm.example.com, http://crm.example.com:8080",
                                    CMS_NODE_SLOTS="8")
    assert result.returncode == 0, result.stdout + result.stderr  # includes `haproxy -c -dW`
    text = (tmp_path / "haproxy.cfg").read_text(encoding="utf-8")
    assert "server-template ws 1-8 ws-node:8081 check resolvers docker init-addr none" in text
    assert "nameserver dns 127.0.0.11:53" in text
    # With a certificate both client ports take TLS and plain (docs/balancer.md): a sniffing TCP frontend
    # binds them, the TLS terminator sits on an internal socket.
    assert "bind 0.0.0.0:2013 name ws" in text and "bind 0.0.0.0:2014 name wss" in text
    assert "accept-proxy name tls ssl crt" in text and "bind 0.0.0.0:8404" in text
    assert "placeholder" not in text
    check = run([haproxy_bin, "-c", "-dW", "-f", str(tmp_path / "haproxy.cfg")])
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CMS_NODE_DNS_NAME", "ws_node"), ("CMS_NODE_SLOTS", "zero"), ("CMS_TLS_CERT", "/nonexistent/cms.pem"),
     ("CMS_ALLOWED_ORIGINS", "https://CRM.example.com/")],
)
def test_compose_haproxy_bad_setting_names_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = render_compose_haproxy(tmp_path, **{variable: value})
    assert result.returncode == 2, result.stdout + result.stderr
    assert variable in result.stderr or "allowed_origins" in result.stderr, result.stderr
    assert not (tmp_path / "haproxy.cfg").exists()


# ---- DNS discovery of scaled nodes: the server-template + resolvers part, on the real haproxy ----


class TinyDns:
    """A UDP DNS server on 127.0.0.1 answering A queries for one name from a list we change.

    Stands in for Docker's embedded DNS (127.0.0.11), which returns one A record per running
    replica of a service; AAAA and other names get an empty NOERROR / NXDOMAIN answer.
    """

    def __init__(self, name: str) -> None:
        self.name = name.lower()
        self.addresses: list[str] = []
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TinyDns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.answer(packet)
            if answer:
                self.sock.sendto(answer, peer)

    def answer(self, packet: bytes) -> bytes | None:
        if len(packet) < 12:
            return None
        labels, offset = [], 12
        while offset < len(packet) and packet[offset] != 0:
            length = packet[offset]
            labels.append(packet[offset + 1: offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        offset += 1
        if offset + 4 > len(packet):
            return None
        qtype = struct.unpack("!H", packet[offset: offset + 2])[0]
        question = packet[12: offset + 4]
        self.queries += 1
        known = ".".join(labels).lower() == self.name
        records = [ipaddress.IPv4Address(a).packed for a in self.addresses] if known and qtype == 1 else []
        flags = 0x8180 if known else 0x8183  # response, recursion desired+available; rcode 0 or 3
        header = packet[:2] + struct.pack("!HHHHH", flags, 1, len(records), 0, 0)
        body = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + rdata for rdata in records)
        return header + question + body


class Backend:
    """An HTTP server on one loopback address answering /health and naming itself on /."""

    def __init__(self, address: str, port: int) -> None:
        name = address

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                body = b"ok" if self.path == "/health" else name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_scaled_nodes_are_found_and_dropped_through_dns(haproxy_bin: str, tmp_path: Path) -> None:
    node_port = free_port()
    backends = [Backend(address, node_port) for address in ("127.0.0.2", "127.0.0.3")]
    ws_port, stats_port = free_port(), free_port()
    with TinyDns("ws-node") as dns:
        dns.addresses = ["127.0.0.2"]
        result = render_compose_haproxy(
            tmp_path, CMS_NODE_PORT=str(node_port), CMS_NODE_SLOTS="4", CMS_DNS_RESOLVER=f"127.0.0.1:{dns.port}",
            CMS_BIND="127.0.0.1", CMS_WS_PORT=str(ws_port), CMS_STATS_BIND="127.0.0.1",
            CMS_STATS_PORT=str(stats_port), CMS_HAPROXY_MAXCONN="1000",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        log = (tmp_path / "haproxy.log").open("wb")
        with log:
            haproxy = subprocess.Popen([haproxy_bin, "-W", "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        api = RuntimeAPI(tmp_path / "run" / "haproxy.sock")

        def slots() -> dict[str, tuple[str, str]]:
            try:
                return {s.name: (s.address.rsplit(":", 1)[0], s.status) for s in api.servers()}
            except (OSError, RuntimeAPIError):
                return {}

        def wait_for(what: str, predicate: Any, timeout: float = 25) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if haproxy.poll() is not None:
                    pytest.fail(f"haproxy exited: {(tmp_path / 'haproxy.log').read_text(errors='replace')}")
                if predicate():
                    return
                time.sleep(0.2)
            pytest.fail(f"timed out waiting for {what}; slots {slots()}, DNS queries {dns.queries}")

        def up() -> set[str]:
            return {addr for addr, status in slots().values() if status == "UP"}

        def hits(n: int) -> set[str]:
            seen = set()
            for _ in range(n):
                with urllib.request.urlopen(f"http://127.0.0.1:{ws_port}/", timeout=2) as response:  # noqa: S310
                    seen.add(response.read().decode())
            return seen

        try:
            wait_for("the first replica UP", lambda: up() == {"127.0.0.2"})
            # Unused slots wait in maintenance until DNS gives them an address.
            assert len(slots()) == 4
            assert sum(status.startswith("MAINT") for _, status in slots().values()) == 3
            assert hits(4) == {"127.0.0.2"}
            dns.addresses = ["127.0.0.2", "127.0.0.3"]  # docker compose up --scale ws_node=2
            wait_for("the new replica UP", lambda: up() == {"127.0.0.2", "127.0.0.3"})
            assert hits(20) == {"127.0.0.2", "127.0.0.3"}
            dns.addresses = ["127.0.0.3"]  # --scale ws_node=1 (its container is gone)
            backends[0].close()
            wait_for("the removed replica's slot freed", lambda: "127.0.0.2" not in {a for a, _ in slots().values()}
                     and up() == {"127.0.0.3"}, timeout=40)
            assert hits(6) == {"127.0.0.3"}
        finally:
            haproxy.send_signal(signal.SIGTERM)
            try:
                haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait(timeout=5)
            for backend in backends[1:]:
                backend.close()
