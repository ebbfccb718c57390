#!/usr/bin/env bash
# Installs what the agent console's browser test needs, only when missing: Debian's headless-capable
# Chromium, the chromedriver built from the same source (so their versions always match), and a
# font so screenshots show text. Idempotent; needs root or sudo. Debian/Ubuntu (apt) only.
#
# The Python side (the WebDriver client) is a dev dependency of the project, installed by `make setup`.
set -euo pipefail
# shellcheck source=scripts/apt-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"

need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# Without any font the page renders as boxes; DejaVu is small and always packaged.
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: please install ${need[*]} with your package manager (apt-get not found)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup-browser: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup-browser: installing ${need[*]} from the OS packages"
apt_install setup-browser "$sudo" "${need[@]}" >/dev/null
