"""The past-one-machine layouts, checked offline by the tools that will read them.

* compose/kubernetes/*.yaml: every resource validates against the Kubernetes 1.30+ schemas with unknown
  fields refused (`kubernetes-validate --strict`, schemas shipped in the PyPI package), and the
  deployment rules hold: readiness on /health, PodDisruptionBudgets that select real pods, anti-affinity,
  a preStop wait that fits in the grace period with the node's drain, one gateway that never overlaps.
* compose/multi-host/*.yml: `docker compose config` (or Debian's `docker-compose config`) with the
  example env; refuses to render without the shared secrets; the processes reach RabbitMQ and Redis
  through the local `backends` proxy.
* The edge HAProxy settings both layouts give the image's render script produce a config `haproxy -c -dW`
  accepts, with the nodes found through the DNS name and resolver they name.
* compose/multi-host/backends.cfg: `haproxy -c -dW`, then for real: two private Redis servers on
  loopback addresses (primary + replica), the proxy sends clients to the primary only, and after a
  failover (the replica promoted, the old primary demoted, as Sentinel does) it sends them to the new one
  and cuts the sessions still open to the old one.
* compose/multi-host/redis.yml: its own commands (from the rendered file, loopback addresses and ports in
  place of the hosts') start a primary, a replica and a Sentinel that finds the replica and fails over to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "compose" / "kubernetes"
MULTI = REPO / "compose" / "multi-host"
KUBE_VERSION = "1.30.0"


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def load_all(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} defined twice"
            found[key] = doc
    assert found, "no manifests in compose/kubernetes"
    return found


# ---- Kubernetes ------------------------------------------------------------------------------------


def test_every_manifest_passes_strict_schema_validation(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    import kubernetes_validate

    for (kind, name), doc in resources.items():
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_the_validator_rejects_a_broken_manifest(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(resources[("Deployment", "cms-ws-node")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)
    wrong_type = copy.deepcopy(resources[("PodDisruptionBudget", "cms-ws-node")])
    wrong_type["spec"]["selector"] = "app=cms-ws-node"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _pod(deployment)["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_gateway_is_a_singleton_that_never_overlaps(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    gateway = resources[("Deployment", "cms-gateway")]
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["strategy"]["type"] == "Recreate"
    assert _container(gateway)["args"] == ["gateway"]
    probe = _container(gateway)["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] == "metrics"
    selectors = [d["spec"]["selector"]["matchLabels"] for (k, _), d in resources.items() if k == "PodDisruptionBudget"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    # a zero-disruption budget on a singleton would block node drains for ever
    assert not any(all(labels.get(k) == v for k, v in s.items()) for s in selectors)


def test_nodes_drain_within_their_grace_period(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    nodes = resources[("Deployment", "cms-ws-node")]
    container = _container(nodes)
    assert container["args"] == ["node"]
    assert nodes["spec"]["replicas"] >= 3
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["port"] in port_names
    env = _env(container)
    assert str(port_names[probe["port"]]) == env["CMS_NODE_PORT"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env["CMS_DRAIN_SECONDS"])
    assert pre_stop >= 10, "HAProxy's resolver holds a record up to 10 s: wait at least that long"
    assert _pod(nodes)["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    # every node has its own queue name: the pod name
    node_id = next(e for e in container["env"] if e["name"] == "CMS_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_disruption_budgets_and_anti_affinity_select_the_real_pods(
        resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    for name in ("cms-ws-node", "cms-haproxy"):
        deployment = resources[("Deployment", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdb = resources[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        required = _pod(deployment)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(term["topologyKey"] == "kubernetes.io/hostname"
                   and term["labelSelector"]["matchLabels"].items() <= labels.items() for term in required)
        replicas = deployment["spec"]["replicas"]
        budget = pdb["spec"]
        allowed = budget.get("maxUnavailable", replicas - budget.get("minAvailable", replicas))
        assert 1 <= allowed < replicas, f"{name}: the budget must allow one disruption and keep one pod"


def test_services_point_at_ports_the_pods_expose(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployments = [d for (k, _), d in resources.items() if k == "Deployment"]
    for (kind, name), service in resources.items():
        if kind != "Service":
            continue
        selected = [d for d in deployments
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} deployments"
        ports = {p["name"] for p in _container(selected[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port named {port['targetPort']}"
    headless = resources[("Service", "ws-node")]
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"]["publishNotReadyAddresses"]
    haproxy_env = _env(_container(resources[("Deployment", "cms-haproxy")]))
    assert haproxy_env["CMS_NODE_DNS_NAME"].startswith("ws-node.cms.svc")


def test_processes_run_unprivileged_with_the_secrets_they_need(
        resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    cluster = resources[("Secret", "cms-cluster")]["stringData"]
    for key in ("CMS_AMQP_URL", "CMS_REDIS_URL", "CMS_PREFIX", "CMS_NODE_SIGNALR_TOKEN_SECRET"):
        assert key in cluster
    settings = json.loads(resources[("Secret", "cms-appsettings")]["stringData"]["appsettings.json"])
    assert {"url", "port", "userName", "secret"} <= settings["Asterisk"].keys()
    for (kind, name), deployment in resources.items():
        if kind != "Deployment":
            continue
        pod = _pod(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        container = _container(deployment)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # the entrypoint writes the health URL (and HAProxy its config) under /run/cms
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/run/cms", "/tmp"} <= mounts, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


# ---- multi-host compose ---------------------------------------------------------------------------


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed: bash scripts/setup-ops.sh")


HOST_FILES = {"gateway": ["backends.yml", "gateway.yml"], "node": ["backends.yml", "node.yml"],
              "edge": ["edge.yml"], "broker": ["broker.yml"], "redis": ["redis.yml"]}


def compose_config(files: list[str], env_file: Path) -> subprocess.CompletedProcess[str]:
    args = [*compose_command(), "--env-file", str(env_file)]
    for name in files:
        args += ["-f", str(MULTI / name)]
    return run([*args, "config"], cwd=MULTI)


@pytest.mark.parametrize("host", sorted(HOST_FILES))
def test_each_host_file_renders_with_the_example_env(host: str) -> None:
    import yaml

    result = compose_config(HOST_FILES[host], MULTI / ".env.example")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["services"]
    for service in config["services"].values():
        env = service.get("environment", {})
        for key in ("CMS_AMQP_URL", "CMS_REDIS_URL"):
            if key in env:  # the processes reach both through the local proxy that follows failovers
                assert "@backends:" in env[key], f"{host}: {key} = {env[key]}"


@pytest.mark.parametrize("host", sorted(HOST_FILES))
def test_each_host_file_refuses_to_render_without_the_shared_settings(host: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("# nothing set\n", encoding="utf-8")
    result = compose_config(HOST_FILES[host], empty)
    assert result.returncode != 0
    assert re.search(r"set [A-Z_]+ in \.env", result.stdout + result.stderr)


def test_shared_settings_are_named_once_and_used() -> None:
    env_names = {line.split("=", 1)[0] for line in (MULTI / ".env.example").read_text().splitlines()
                 if line and not line.startswith("#")}
    used: set[str] = set()
    for path in [*MULTI.glob("*.yml"), MULTI / "backends.cfg"]:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()))
    unused = env_names - used
    assert not unused, f".env.example names settings no file reads: {sorted(unused)}"
    cluster_conf = (MULTI / "rabbitmq" / "30-cluster.conf").read_text()
    assert len(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@", cluster_conf, re.M)) == 3


# ---- the backends proxy, for real ----------------------------------------------------------------


def _haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        pytest.fail("haproxy is not installed (scripts/setup-system.sh)")
    return found


def _free_port_on(*hosts: str) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")


def _backends_env(redis: list[str], redis_bind: str, amqp_bind: str) -> dict[str, str]:
    return {**os.environ, "CMS_BROKER1": "127.0.0.1", "CMS_BROKER2": "127.0.0.2", "CMS_BROKER3": "127.0.0.3",
            "CMS_REDIS1": redis[0], "CMS_REDIS2": redis[1], "CMS_REDIS3": redis[2], "REDIS_PASSWORD": "test-secret",
            "CMS_BACKENDS_REDIS_BIND": redis_bind, "CMS_BACKENDS_AMQP_BIND": amqp_bind}


def _test_cfg(tmp_path: Path) -> Path:
    """backends.cfg as shipped, except that the Redis servers carry their own port (the shipped file appends
    6379: here three servers share one loopback port on three addresses, so the port rides in the env), checks
    come faster, and maxconn fits this machine's descriptor limit."""
    text = (MULTI / "backends.cfg").read_text()
    assert text.count(':6379" check') == 3 and text.count("maxconn 20000") == 1
    cfg = tmp_path / "backends.cfg"
    cfg.write_text(text.replace(':6379" check', '" check inter 300ms').replace("maxconn 20000", "maxconn 1000"))
    return cfg


def test_backends_proxy_config_passes_haproxy_check(tmp_path: Path) -> None:
    env = _backends_env(["127.0.0.1", "127.0.0.2", "127.0.0.3"], ":16379", ":15672")
    result = run([_haproxy(), "-c", "-dW", "-f", str(MULTI / "backends.cfg")], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[list[str], int]]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (scripts/setup-system.sh)")
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # the third stays down: a Redis host that is gone
    port = _free_port_on(*hosts)
    processes = []
    try:
        for i, host in enumerate(hosts[:2]):
            data = tmp_path / f"redis{i}"
            data.mkdir()
            args = [server, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no", "--dir",
                    str(data), "--requirepass", "test-secret", "--masterauth", "test-secret"]
            if i == 1:
                args += ["--replicaof", hosts[0], str(port)]
            processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 15
        for host in hosts[:2]:
            while True:
                try:
                    socket.create_connection((host, port), timeout=0.3).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        yield hosts, port
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def _read_replies(sock: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _role_through(port: int) -> str:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password="test-secret", socket_timeout=2)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        except Exception as exc:  # redis errors while the proxy switches over
            if "redis" not in type(exc).__module__:
                raise
        time.sleep(0.2)
    return False


def test_backends_proxy_follows_a_redis_failover(tmp_path: Path, two_redis: tuple[list[str], int]) -> None:
    import redis

    hosts, redis_port = two_redis
    front = _free_port_on("127.0.0.1")
    amqp_front = _free_port_on("127.0.0.1")
    env = _backends_env([f"{host}:{redis_port}" for host in hosts], f"127.0.0.1:{front}", f"127.0.0.1:{amqp_front}")
    proxy = subprocess.Popen([_haproxy(), "-db", "-f", str(_test_cfg(tmp_path))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert proxy.poll() is None, proxy.communicate()[1]
    try:
        # Until its first check fails HAProxy counts the replica as up (see backends.cfg); once the checks
        # have run, every connection lands on the primary, never on the replica.
        assert _wait_for(lambda: all(_role_through(front) == "master" for _ in range(4)), 15), \
            "proxy never settled on the primary"
        for _ in range(10):
            assert _role_through(front) == "master"
        # A raw session opened before the failover (redis-py would hide a cut by reconnecting by itself).
        held = socket.create_connection(("127.0.0.1", front), timeout=5)
        held.sendall(b"AUTH test-secret\r\nSET before 1\r\n")
        assert _read_replies(held, 2) == b"+OK\r\n+OK\r\n"
        primary = redis.Redis(host=hosts[0], port=redis_port, password="test-secret")
        replica = redis.Redis(host=hosts[1], port=redis_port, password="test-secret")
        assert _wait_for(lambda: replica.get("before") == b"1", 10), "replica never caught up"
        # What Sentinel does on a failover: promote the replica, make the old primary follow it.
        replica.execute_command("REPLICAOF", "NO", "ONE")
        primary.execute_command("REPLICAOF", hosts[1], str(redis_port))
        assert _wait_for(lambda: redis.Redis(host="127.0.0.1", port=front, password="test-secret",
                                             socket_timeout=2).set("after", "2"), 15), \
            "writes through the proxy never reached the promoted replica"
        assert replica.get("after") == b"2"
        # the session opened before the failover was cut rather than left on a now read-only replica
        try:
            held.sendall(b"SET stale x\r\n")
            answer = held.recv(4096)
        except OSError:
            answer = b""
        assert answer == b"", f"the old session still answers: {answer!r}"
        held.close()
        primary.close()
        replica.close()
    finally:
        proxy.terminate()
        proxy.communicate(timeout=10)


# ---- the edge HAProxy, rendered with the settings these layouts give it ----------------------------


def _render_edge(tmp_path: Path, settings: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMS_")}
    env.update(PYTHONPATH=str(REPO), CMS_RUN_DIR=str(tmp_path / "run"), **settings)
    out = tmp_path / "haproxy.cfg"
    result = run([sys.executable, str(REPO / "compose" / "haproxy" / "render_haproxy.py"), "--out", str(out)],
                 env=env)
    return result, out.read_text() if out.exists() else ""


def test_the_kubernetes_haproxy_settings_render_a_config_haproxy_accepts(
        resources: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    settings = _env(_container(resources[("Deployment", "cms-haproxy")]))
    result, text = _render_edge(tmp_path, settings)
    assert result.returncode == 0, result.stdout + result.stderr  # the script runs `haproxy -c -dW`
    slots = settings["CMS_NODE_SLOTS"]
    assert f"server-template ws 1-{slots} {settings['CMS_NODE_DNS_NAME']}:{settings['CMS_NODE_PORT']}" in text
    assert f"nameserver dns {settings['CMS_DNS_RESOLVER']}" in text
    assert f"maxconn {settings['CMS_HAPROXY_MAXCONN']}" in text


def test_the_multi_host_edge_settings_render_a_config_haproxy_accepts(tmp_path: Path) -> None:
    import yaml

    rendered = compose_config(HOST_FILES["edge"], MULTI / ".env.example")
    assert rendered.returncode == 0, rendered.stderr
    environment = yaml.safe_load(rendered.stdout)["services"]["haproxy"]["environment"]
    settings = {k: str(v) for k, v in environment.items() if v not in (None, "")}
    result, text = _render_edge(tmp_path, settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ws-nodes.cms.internal:8081" in text and "nameserver dns 10.0.0.2:53" in text


# ---- the Redis host's own commands: primary, replica and Sentinel, for real ----------------------


def _redis_host_commands() -> tuple[str, str]:
    """The shell commands redis.yml gives its two services, as the container's sh would get them."""
    import yaml

    rendered = compose_config(HOST_FILES["redis"], MULTI / ".env.example")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    # Compose 1.x prints `$$` (its escape) back; the container's shell sees `$`.
    return (services["redis"]["command"][2].replace("$$", "$"), services["sentinel"]["command"][2].replace("$$", "$"))


def test_the_redis_hosts_commands_form_a_replicated_set_that_sentinel_fails_over(tmp_path: Path) -> None:
    import redis

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/setup-system.sh)")
    server_command, sentinel_command = _redis_host_commands()
    primary_host, replica_host = "127.0.0.5", "127.0.0.6"
    port = _free_port_on(primary_host, replica_host)
    sentinel_port = _free_port_on(primary_host)
    # Same commands, loopback ports and folders instead of 6379/26379 and the container's volumes.
    assert server_command.count("--port 6379") == 1 and sentinel_command.count("port 26379") == 1
    assert sentinel_command.count("6379 2") == 1 and sentinel_command.count("/sentinel/") == 1
    server_command = server_command.replace("--port 6379", f"--port {port}")
    sentinel_command = (sentinel_command.replace("port 26379", f"port {sentinel_port}")
                        .replace("6379 2", f"{port} 2").replace("/sentinel/", f"{tmp_path}/"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CMS_", "REDIS"))}
    secret = "test-secret"
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: str, cwd: Path, **env: str) -> None:
        cwd.mkdir(exist_ok=True)
        processes.append(subprocess.Popen(["sh", "-c", command], cwd=cwd, env={**base, **env},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        start(server_command, tmp_path / "primary", CMS_PRIVATE_IP=primary_host, REDIS_PASSWORD=secret,
              REDIS_REPLICAOF="")
        start(server_command, tmp_path / "replica", CMS_PRIVATE_IP=replica_host, REDIS_PASSWORD=secret,
              REDIS_REPLICAOF=f"{primary_host} {port}")
        start(sentinel_command, tmp_path / "sentinel", CMS_PRIVATE_IP=primary_host, CMS_REDIS1=primary_host,
              REDIS_PASSWORD=secret)
        primary = redis.Redis(host=primary_host, port=port, password=secret, socket_timeout=2)
        replica = redis.Redis(host=replica_host, port=port, password=secret, socket_timeout=2)
        sentinel = redis.Redis(host=primary_host, port=sentinel_port, socket_timeout=2)
        assert _wait_for(lambda: replica.info("replication")["master_link_status"] == "up", 20), \
            "the replica never synced from the primary"
        assert _wait_for(lambda: sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "cms")
                         == [primary_host.encode(), str(port).encode()], 20)
        def replica_ready() -> bool:
            replicas = sentinel.sentinel_slaves("cms")  # parsed: one dict per replica
            return (len(replicas) == 1 and replicas[0].get("is_slave") is True
                    and not replicas[0].get("is_disconnected") and replicas[0].get("master-link-status") == "ok")

        assert _wait_for(replica_ready, 30), \
            f"Sentinel never saw a healthy replica: {sentinel.sentinel_slaves('cms')}"
        primary.set("before", "1")
        # A failover as the Sentinels would do it on a dead primary (one Sentinel here: forced).
        sentinel.execute_command("SENTINEL", "FAILOVER", "cms")
        assert _wait_for(lambda: sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "cms")
                         == [replica_host.encode(), str(port).encode()], 30), "Sentinel did not promote the replica"
        assert _wait_for(lambda: replica.info("replication")["role"] == "master", 10)
        assert _wait_for(lambda: primary.info("replication")["role"] == "slave", 20), \
            "the old primary was not turned into a replica"
        assert replica.get("before") == b"1"
        # Sentinel rewrote its file; a restart keeps it (the command writes the file only when it is empty).
        conf = (tmp_path / "sentinel.conf").read_text()
        assert f"sentinel monitor cms {replica_host} {port}" in conf
        for client in (primary, replica, sentinel):
            client.close()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
