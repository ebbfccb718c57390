# Sourced by the setup-*.sh scripts: apt-get that waits for another apt/dpkg instead of failing.
#
# A fresh cloud machine runs unattended-upgrades (or cloud-init's own apt) for minutes after boot;
# apt-get then fails at once with "Could not get lock /var/lib/dpkg/lock-frontend". Installing
# waits through apt's own DPkg::Lock::Timeout; `apt-get update` (the lists lock) and any lock
# apt does not wait for are retried here until APT_LOCK_TIMEOUT seconds (default 600) have passed.

APT_LOCK_TIMEOUT="${APT_LOCK_TIMEOUT:-600}"

# apt_locked_retry WHO CMD...: run CMD; while it fails on a lock held by someone else, wait and retry.
apt_locked_retry() {
  local who="$1" deadline=$((SECONDS + APT_LOCK_TIMEOUT)) out said=""
  shift
  while true; do
    if out="$("$@" 2>&1)"; then
      return 0
    fi
    if grep -qiE 'could not get lock|unable to lock|unable to acquire the dpkg frontend lock|is another process using it' \
        <<<"$out" && [ "$SECONDS" -lt "$deadline" ]; then
      if [ -z "$said" ]; then
        echo "$who: another apt/dpkg is running (unattended upgrades?); waiting up to ${APT_LOCK_TIMEOUT}s for it" >&2
        said=1
      fi
      sleep 3
      continue
    fi
    printf '%s\n' "$out" >&2
    return 1
  done
}

# apt_install WHO SUDO PACKAGE...: apt-get update + install --no-install-recommends, lock-patient.
apt_install() {
  local who="$1" sudo="$2"
  shift 2
  export DEBIAN_FRONTEND=noninteractive
  apt_locked_retry "$who" $sudo apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" update -qq
  apt_locked_retry "$who" $sudo apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" install -y -qq \
    --no-install-recommends "$@"
}
