#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, running deskgen exactly as deployed in production.
#
#   cluster/local.sh start    # head node (CPU, `cpu_node`) + GPU node(s) (logical GPUs, `gpu_node`),
#                             # then `serve deploy serve_config.yaml`; returns once /readyz answers 200.
#                             # Jobs whose Redis is on this machine (serve_config.yaml's redis_url) get a
#                             # Redis of the cluster's own (STATE/redis, stopped with the cluster)
#   cluster/local.sh status   # endpoints, nodes, Serve status, where each replica runs
#   cluster/local.sh stop     # ends exactly the processes this cluster started (never `ray stop`,
#                             # which kills every Ray process on the machine)
#
# Settings (environment; defaults in brackets):
#   DESKGEN_CLUSTER_DIR        state: token, logs, Ray temp dir, cluster.env [<repo>/.cluster]
#   DESKGEN_SERVE_CONFIG       the Serve config to deploy [<repo>/serve_config.yaml]
#   DESKGEN_CLUSTER_HTTP_PORT  Serve's HTTP port on 127.0.0.1 [8100; `make serve` keeps 8000]
#   DESKGEN_CLUSTER_DASHBOARD_PORT [8266]   DESKGEN_CLUSTER_GCS_PORT [6390]
#   DESKGEN_CLUSTER_REDIS_PORT the cluster's Redis on 127.0.0.1 (jobs) [6391; `make serve`'s is 6380]
#   DESKGEN_CLUSTER_PORT_BASE  per-node agent/metrics ports: base + 20 * node + k [52400]
#   DESKGEN_CLUSTER_WORKER_PORT_BASE  per-node worker port ranges of 200 [21000]
#   DESKGEN_CLUSTER_HEAD_CPUS  logical CPUs of the head: Ingress 0.5 + 4 Classifiers at max + Recorder and JobConsumer 0.25 each [5]
#   DESKGEN_CLUSTER_GPU_NODES  GPU nodes [1]   DESKGEN_CLUSTER_GPUS  logical GPUs per GPU node [2]
#   DESKGEN_CLUSTER_GPU_NODE_CPUS  logical CPUs per GPU node [3]
#   DESKGEN_CLUSTER_OBJECT_STORE_BYTES  object store per node [268435456]
#   DESKGEN_CLUSTER_TIMEOUT    seconds `start` waits for the app [300]
#   DESKGEN_CLUSTER_KEEP_FAILED=1  leave a cluster whose deploy failed running, to inspect it
#
# Logical CPUs/GPUs are what the scheduler counts, not what the machine has: on a CPU-only machine
# the "GPU" replicas run their models on the CPU. Token auth (on by default in Ray 2.60) uses a
# token of this cluster's own (STATE/auth_token); clients need RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH=STATE/auth_token (`status` prints them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DESKGEN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
RAY="$VENV/bin/ray"
SERVE="$VENV/bin/serve"
STATE="${DESKGEN_CLUSTER_DIR:-$ROOT/.cluster}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd -P)"
CONFIG="$(realpath -m "${DESKGEN_SERVE_CONFIG:-$ROOT/serve_config.yaml}")"
HTTP_HOST=127.0.0.1
HTTP_PORT="${DESKGEN_CLUSTER_HTTP_PORT:-8100}"
DASHBOARD_PORT="${DESKGEN_CLUSTER_DASHBOARD_PORT:-8266}"
GCS_PORT="${DESKGEN_CLUSTER_GCS_PORT:-6390}"
REDIS_PORT="${DESKGEN_CLUSTER_REDIS_PORT:-6391}"
PORT_BASE="${DESKGEN_CLUSTER_PORT_BASE:-52400}"
WORKER_PORT_BASE="${DESKGEN_CLUSTER_WORKER_PORT_BASE:-21000}"
HEAD_CPUS="${DESKGEN_CLUSTER_HEAD_CPUS:-5}"
GPU_NODES="${DESKGEN_CLUSTER_GPU_NODES:-1}"
GPUS="${DESKGEN_CLUSTER_GPUS:-2}"
GPU_NODE_CPUS="${DESKGEN_CLUSTER_GPU_NODE_CPUS:-3}"
OBJECT_STORE_BYTES="${DESKGEN_CLUSTER_OBJECT_STORE_BYTES:-268435456}"
TIMEOUT="${DESKGEN_CLUSTER_TIMEOUT:-300}"
TEMP_DIR="$STATE/ray"
LOGS="$STATE/logs"
TOKEN="$STATE/auth_token"
# The repo on the path of every node (graph:app, deployments, deskgen) and of the helpers below;
# entries the caller put in PYTHONPATH come first.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
# Ray puts a driver's working directory first on its workers' sys.path, and `serve-start` below is
# the driver that starts the Serve controller: run from the repo, so the app is always this repo's.
cd "$ROOT"

die() { echo "local.sh: $*" >&2; exit 1; }

# Environment of a Ray client (serve CLI, drivers): this cluster's token, no inherited address.
client() { env -u RAY_ADDRESS -u RAY_AUTH_TOKEN -u RAY_OVERRIDE_RESOURCES \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$@"; }

pids() { "$PY" -m cluster.local pids "$STATE"; }

# Node number $1's metrics export port, the first of its ports (what Prometheus scrapes).
metrics_port() { echo $((PORT_BASE + 20 * $1)); }

# Every node's metrics endpoint, head first (space-separated host:port).
metrics_targets() {
  local n out=""
  for ((n = 0; n <= GPU_NODES; n++)); do out+="127.0.0.1:$(metrics_port "$n") "; done
  echo "${out% }"
}

# The ports of node number $1 (0 = head): agents, metrics and workers must not collide between the
# nodes sharing this machine.
node_ports() {
  local n=$1 base=$(metrics_port "$1") wbase=$((WORKER_PORT_BASE + 200 * $1))
  echo "--metrics-export-port=$base --dashboard-agent-listen-port=$((base + 1))" \
       "--dashboard-agent-grpc-port=$((base + 2)) --runtime-env-agent-port=$((base + 3))" \
       "--node-manager-port=$((base + 4)) --object-manager-port=$((base + 5))" \
       "--min-worker-port=$wbase --max-worker-port=$((wbase + 199))"
  [[ $n == 0 ]] && echo "--ray-client-server-port=$((base + 6))"
  return 0
}

ray_start() {  # ray_start LOGNAME ARGS... : one `ray start` with the node environment
  local name=$1; shift
  # RAY_OVERRIDE_RESOURCES (set by `make serve`'s environment) would replace the resources declared
  # here; the mark lets `stop` find every process this node starts, workers included.
  if ! env -u RAY_OVERRIDE_RESOURCES -u RAY_ADDRESS -u RAY_AUTH_TOKEN \
      RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" DESKGEN_CLUSTER_MARK="$MARK" \
      RAY_USAGE_STATS_ENABLED=0 \
      "$RAY" start --temp-dir="$TEMP_DIR" --object-store-memory="$OBJECT_STORE_BYTES" \
      --disable-usage-stats "$@" >"$LOGS/$name.log" 2>&1; then
    tail -n 20 "$LOGS/$name.log" >&2
    return 1
  fi
}

start() {
  [[ -z "$(pids)" ]] || die "a cluster is already running in $STATE (cluster/local.sh status | stop)"
  [[ -f "$CONFIG" ]] || die "no Serve config at $CONFIG"
  [[ -x "$RAY" ]] || die "no $RAY: run make install"
  mkdir -p "$LOGS"
  "$PY" -m cluster.local token "$TOKEN"
  MARK="$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')"
  echo "$MARK" >"$STATE/mark"
  cat >"$STATE/cluster.env" <<EOF
# written by cluster/local.sh start; read by cluster.local.LocalCluster
HTTP_HOST=$HTTP_HOST
HTTP_PORT=$HTTP_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
GCS_PORT=$GCS_PORT
REDIS_PORT=$REDIS_PORT
GPU_NODES=$GPU_NODES
METRICS_TARGETS="$(metrics_targets)"
CONFIG=$CONFIG
EOF
  local t0=$SECONDS deploy
  deploy="$("$PY" -m cluster.local deployable "$STATE" "$CONFIG" --redis-port "$REDIS_PORT")" || fail_start
  echo "starting the head node (CPU, cpu_node) on 127.0.0.1:$GCS_PORT, dashboard 127.0.0.1:$DASHBOARD_PORT"
  # shellcheck disable=SC2046  # node_ports prints flags meant to be split
  ray_start head --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"cpu_node": 1}' \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" $(node_ports 0) || fail_start
  for i in $(seq 1 "$GPU_NODES"); do
    echo "starting GPU node $i ($GPUS logical GPUs, gpu_node)"
    # shellcheck disable=SC2046
    ray_start "gpu-$i" --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
      --num-cpus="$GPU_NODE_CPUS" --num-gpus="$GPUS" --resources='{"gpu_node": 1}' \
      $(node_ports "$i") || fail_start
  done
  echo "starting Serve on http://$HTTP_HOST:$HTTP_PORT, deploying $CONFIG (as $deploy)"
  client "$PY" -m cluster.local serve-start "$STATE" "$CONFIG" >"$LOGS/serve-start.log" 2>&1 \
    || { tail -n 20 "$LOGS/serve-start.log" >&2; fail_start; }
  client "$SERVE" deploy "$deploy" -a "http://127.0.0.1:$DASHBOARD_PORT" >"$LOGS/deploy.log" 2>&1 \
    || { tail -n 20 "$LOGS/deploy.log" >&2; fail_start; }
  client "$PY" -m cluster.local wait "$STATE" --timeout "$TIMEOUT" || fail_start
  echo "cluster up in $((SECONDS - t0)) s: http://$HTTP_HOST:$HTTP_PORT (cluster/local.sh status)"
}

fail_start() {
  client "$SERVE" status -a "http://127.0.0.1:$DASHBOARD_PORT" >&2 2>/dev/null || true
  if [[ "${DESKGEN_CLUSTER_KEEP_FAILED:-0}" == 1 ]]; then
    die "start failed; the cluster is left running for inspection (logs: $LOGS, $TEMP_DIR/session_latest/logs)"
  fi
  stop >&2
  die "start failed (logs: $LOGS, $TEMP_DIR/session_latest/logs)"
}

stop() {
  if [[ -z "$(pids)" ]]; then
    echo "no cluster running in $STATE"
  else
    "$PY" -m cluster.local kill "$STATE"
  fi
  "$PY" -m deskgen.tools.redis stop --dir "$STATE/redis"
  rm -f "$STATE/mark"
}

status() {
  if [[ -z "$(pids)" ]]; then
    echo "no cluster running in $STATE"
    return 3
  fi
  # shellcheck disable=SC1091
  source "$STATE/cluster.env"
  echo "Serve:      http://127.0.0.1:$HTTP_PORT"
  echo "dashboard:  http://127.0.0.1:$DASHBOARD_PORT   GCS: 127.0.0.1:$GCS_PORT"
  [[ -f "$STATE/redis/redis.pid" ]] && echo "redis:      redis://127.0.0.1:$REDIS_PORT/0 (jobs; data in $STATE/redis)"
  echo "metrics:    $METRICS_TARGETS (Prometheus targets: one per node)"
  echo "clients:    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN"
  echo "config:     $CONFIG"
  echo
  client "$PY" -m cluster.local describe "$STATE" || true
  echo
  client "$SERVE" status -a "http://127.0.0.1:$DASHBOARD_PORT" || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
