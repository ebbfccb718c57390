#!/usr/bin/env bash
# Installs the OS packages the cluster and its tests need, only when missing:
# HAProxy and Node.js always; Redis and RabbitMQ servers only when none is listening on the default port
# (a machine that already runs them keeps its own). Debian/Ubuntu (apt) only.
set -euo pipefail
# shellcheck source=scripts/apt-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"

need=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Node.js runs Microsoft's @microsoft/signalr client in the SignalR compatibility tests.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if ! listening 6379 && ! command -v redis-server >/dev/null 2>&1; then need+=(redis-server); fi
if ! listening 5672 && ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  need+=(rabbitmq-server)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: please install ${need[*]} with your package manager (apt-get not found)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${need[*]} from the OS packages"
# Debian's redis-server/rabbitmq-server start their system services where an init system runs
# them; the cluster then reuses them like any server already listening (each run in its own
# namespace), and starts private instances under .run/ when none listens.
apt_install setup "$sudo" "${need[@]}" >/dev/null
