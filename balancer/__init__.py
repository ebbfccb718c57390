"""HAProxy in front of the ws_node processes: cluster description, config rendering, control."""

from balancer.cluster import BACKEND_NAME, ClusterConfigError, ClusterDescription, DnsDiscovery, Node, load_cluster
from balancer.haproxy_ctl import (
    ConfigCheckError,
    HAProxyError,
    RuntimeAPI,
    RuntimeAPIError,
    ServerStatus,
    check_config,
    reload,
)
from balancer.render import render_config

__all__ = [
    "BACKEND_NAME",
    "ClusterConfigError",
    "ClusterDescription",
    "ConfigCheckError",
    "DnsDiscovery",
    "HAProxyError",
    "Node",
    "RuntimeAPI",
    "RuntimeAPIError",
    "ServerStatus",
    "check_config",
    "load_cluster",
    "reload",
    "render_config",
]
