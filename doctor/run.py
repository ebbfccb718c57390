"""Runs every check in order and hands each result to the printer as soon as it is known."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from balancer.cluster import ClusterConfigError, ClusterDescription, Node
from doctor.ami_check import check_ami
from doctor.creatio_check import CreatioAccount, check_creatio
from doctor.infra_checks import check_broker, check_haproxy, check_namespace, check_ports, check_redis
from doctor.report import Result, Status, failed, passed, skipped
from doctor.tls_check import check_certificate_file
from services.config import ConfigError, Settings, load_settings

#: the ports `make run` and a default deployment use on the balancer/node machine
DEFAULT_NODE_PORTS = (2101, 2102)
DEFAULT_GATEWAY_METRICS_PORT = 9101


@dataclass
class DoctorOptions:
    config: Path | None = None
    #: the balancer's cluster description (JSON, as `python -m balancer --cluster` reads)
    cluster: Path | None = None
    tls_cert: Path | None = None
    #: the host name in Creatio's "Message exchange server" URL (checked against the certificate)
    public_host: str | None = None
    #: extra ports to check, (what, host, port)
    ports: list[tuple[str, str, int]] = field(default_factory=list)
    check_ports: bool = True
    gateway_metrics_port: int = DEFAULT_GATEWAY_METRICS_PORT
    listen_seconds: float = 5.0
    timeout: float = 5.0
    creatio: CreatioAccount | None = None


def _load_config(options: DoctorOptions) -> tuple[Settings | None, Result]:
    name = "configuration parses, every value valid"
    where = str(options.config) if options.config else "(no file: defaults and CMS_* environment)"
    try:
        settings = load_settings(options.config)
    except ConfigError as exc:
        return None, failed(name, str(exc), f"correct it in {where} and run doctor again")
    ast = settings.asterisk
    if ast.uses_pbx and not ast.secret:
        return settings, failed(name, f"{where}: Asterisk.secret is empty",
                                "set Asterisk.secret to the secret= of the AMI user in manager.conf")
    pbx = (f"PBX {ast.url}:{ast.port} as {ast.user_name}" if ast.uses_pbx
           else f"replay of {ast.file_path}" if ast.file_path else "no PBX (built-in simulator)")
    return settings, passed(name, f"{where}: {pbx}, protocol {ast.protocol}, prefix {settings.cluster.prefix!r}")


def _cluster_description(options: DoctorOptions) -> ClusterDescription | ClusterConfigError:
    if options.cluster is None:
        return ClusterDescription(
            nodes=tuple(Node(name=f"node{i + 1}", host="127.0.0.1", port=p) for i, p in enumerate(DEFAULT_NODE_PORTS)),
            tls_cert=options.tls_cert,
        )
    try:
        data = json.loads(options.cluster.read_text(encoding="utf-8"))
    except OSError as exc:
        return ClusterConfigError(str(options.cluster), f"cannot read: {exc.strerror}")
    except ValueError as exc:
        return ClusterConfigError(str(options.cluster), f"invalid JSON: {exc}")
    if isinstance(data, dict) and options.tls_cert is not None:
        data["tls_cert"] = str(options.tls_cert)
    try:
        return ClusterDescription.from_dict(data)
    except ClusterConfigError as exc:
        return exc


def _local(host: str) -> bool:
    if host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::"):
        return True
    try:
        return host in {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False


def _ports(options: DoctorOptions, description: ClusterDescription | ClusterConfigError) -> list[tuple[str, str, int]]:
    ports: list[tuple[str, str, int]] = []
    if isinstance(description, ClusterDescription):
        ports.append(("HAProxy ws://", description.bind, description.ws_port))
        if description.tls_enabled:
            ports.append(("HAProxy wss://", description.bind, description.wss_port))
        if description.stats_port is not None:
            ports.append(("HAProxy stats", description.stats_bind, description.stats_port))
        ports.extend((f"node {n.name}", n.host, n.port) for n in description.nodes if _local(n.host))
    ports.append(("gateway /metrics", "127.0.0.1", options.gateway_metrics_port))
    ports.extend(options.ports)
    seen: set[tuple[str, int]] = set()
    unique = []
    for what, host, port in ports:
        if (host, port) not in seen:
            seen.add((host, port))
            unique.append((what, host, port))
    return unique


async def run_checks(options: DoctorOptions, emit: Callable[[Result], None]) -> list[Result]:
    results: list[Result] = []

    def add(*items: Result) -> None:
        for item in items:
            results.append(item)
            emit(item)

    settings, config_result = _load_config(options)
    add(config_result)
    if settings is None:
        add(skipped("PBX, RabbitMQ, Redis", "need a valid configuration first"))
    else:
        add(*await check_ami(settings.asterisk, listen_seconds=options.listen_seconds, timeout=options.timeout))
        add(await check_broker(settings.cluster, options.timeout))
        redis_result = await check_redis(settings.cluster, options.timeout)
        add(redis_result)
        if redis_result.status is Status.PASS:
            add(await check_namespace(settings.cluster, options.timeout))
    description = _cluster_description(options)
    add(check_haproxy(description))
    if options.check_ports:
        add(*check_ports(_ports(options, description)))
    else:
        add(skipped("ports free", "--skip-ports (the cluster is running here)"))
    cert = options.tls_cert or (description.tls_cert if isinstance(description, ClusterDescription) else None)
    add(*check_certificate_file(cert, options.public_host))
    add(*await check_creatio(options.creatio or _records_account(settings), options.timeout))
    return results


def _records_account(settings: Settings | None) -> CreatioAccount | None:
    """The service account of the config's CallRecords block, when call records are configured."""
    if settings is None or not settings.call_records.enabled or not settings.call_records.user_name:
        return None
    records = settings.call_records
    site = records.site_url or (records.allowed_site_urls[0] if records.allowed_site_urls else "")
    return CreatioAccount(site, records.user_name, records.password) if site else None
