#!/usr/bin/env bash
# Installs, only when missing, the OS packages the ops/ and compose/ checks need:
#   prometheus      -> `promtool` (check config / check rules / test rules) and the `prometheus`
#                      binary the scrape test starts on a private port
#   docker-compose  -> `docker-compose config` validates compose/docker-compose.yml without a Docker
#                      engine (only when no `docker compose` plugin is present); it brings python3-yaml,
#                      which the compose tests use to read the file
# Idempotent; root or sudo; Debian/Ubuntu (apt) only.
#
# The binaries are all we want: Debian's prometheus package would otherwise start a system-wide
# Prometheus on :9090 (and keep it on every boot). A policy-rc.d that answers 101 ("action
# forbidden") stops invoke-rc.d from starting it during the install, and on systemd hosts the unit
# is stopped and disabled right after, but only when this script installed the package.
set -euo pipefail
# shellcheck source=scripts/apt-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"

need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
have_compose() {
  { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } ||
    command -v docker-compose >/dev/null 2>&1
}
have_compose || need+=(docker-compose)
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || need+=(python3-yaml)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-ops: please install ${need[*]} with your package manager (apt-get not found)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup-ops: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi

policy=/usr/sbin/policy-rc.d
placed_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# placed by scripts/setup-ops.sh for the duration of one install\nexit 101\n' |
    $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  placed_policy=1
fi
cleanup() { if [ -n "$placed_policy" ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

echo "setup-ops: installing ${need[*]} from the OS packages"
apt_install setup-ops "$sudo" "${need[@]}" >/dev/null

if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  # Debian's postinst enables the unit; we only wanted promtool and the binary.
  $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1 || { echo "setup-ops: promtool still missing after the install" >&2; exit 1; }
