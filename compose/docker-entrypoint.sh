#!/bin/sh
# Role selector for the asterisk-cms image. Logs go to stdout as JSON lines (one object a line),
# which `docker compose logs` and any log shipper read as they are.
set -eu

run_dir="${CMS_RUN_DIR:-/run/cms}"
mkdir -p "$run_dir"
health() { printf '%s\n' "$1" > "$run_dir/health-url"; }

role="${1:-node}"
case "$role" in
  gateway)
    shift
    health "http://127.0.0.1:${CMS_METRICS_PORT}/health"
    # 0.0.0.0 inside the container so Prometheus can scrape it; the compose file publishes nothing.
    exec python -m ami_gateway --config "$CMS_CONFIG" \
      --metrics-host 0.0.0.0 --metrics-port "$CMS_METRICS_PORT" --log-json "$@"
    ;;
  node)
    shift
    health "http://127.0.0.1:${CMS_NODE_PORT}/health"
    # The container's hostname (its short id) is unique per replica: it names the node's queues.
    exec python -m ws_node --config "$CMS_CONFIG" --host 0.0.0.0 --port "$CMS_NODE_PORT" \
      --node-id "${CMS_NODE_ID:-$(hostname)}" --drain-seconds "${CMS_DRAIN_SECONDS:-10}" --log-json "$@"
    ;;
  haproxy)
    shift
    health "http://127.0.0.1:8404/healthz"
    cfg="$run_dir/haproxy.cfg"
    # Renders through the balancer and runs `haproxy -c -dW`; a config that fails never starts.
    python /app/compose/haproxy/render_haproxy.py --out "$cfg"
    # -W master-worker (reload = SIGUSR2 via `python -m balancer reload`), -db stay in the foreground.
    exec haproxy -W -db -f "$cfg" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
