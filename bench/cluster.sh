#!/usr/bin/env bash
# A 3-node Concord and a 3-node real etcd on this machine (loopback, separate temp data
# dirs), driven one after the other by the same client (integration/examples/
# bench_cluster.rs): single-client put latency p50/p99 (sequential puts to the leader)
# and C-client put throughput (C tasks over CONNS connections spread over all three
# members). Prints a table with Concord, etcd and Concord/etcd.
#
#   bench/cluster.sh                                   # 2000 ops; 1000 clients for 15 s
#   OPS=5000 CLIENTS=1000 SECS=30 CONNS=64 VALUE=256 bench/cluster.sh
#   CONCORD_BIN=/path/to/concord bench/cluster.sh      # use that binary, build only the client
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${OPS:-2000}
CLIENTS=${CLIENTS:-1000}
CONNS=${CONNS:-48}
SECS=${SECS:-15}
VALUE=${VALUE:-256}
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/concord-release}
T=$CARGO_TARGET_DIR/release

scripts/deps.sh
if [ -n "${CONCORD_BIN:-}" ]; then
  # The client alone: the integration crate does not depend on the server (no RocksDB).
  cargo build --release --quiet -p concord-integration --example bench_cluster
  CONCORD=$CONCORD_BIN
else
  cargo build --release --quiet --workspace --bin concord --examples
  CONCORD=$T/concord
fi
BENCH=$T/examples/bench_cluster

WORK=$(mktemp -d /tmp/concord-cluster-bench.XXXXXX)
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_cluster KIND: starts 3 members in the background (pids in PIDS), sets ENDPOINTS.
start_cluster() {
  local kind=$1 i cluster="" cports=() pports=()
  for i in 1 2 3; do
    cports+=("$(free_port)"); pports+=("$(free_port)")
    cluster+="${cluster:+,}n$i=http://127.0.0.1:${pports[i-1]}"
  done
  ENDPOINTS=""
  for i in 1 2 3; do
    local c="http://127.0.0.1:${cports[i-1]}" p="http://127.0.0.1:${pports[i-1]}"
    local dir=$WORK/$kind/n$i
    mkdir -p "$WORK/$kind"
    ENDPOINTS+="${ENDPOINTS:+,}$c"
    local args=(--name "n$i" --data-dir "$dir" --listen-client-urls "$c" --advertise-client-urls "$c"
                --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "$cluster"
                --initial-cluster-state new --initial-cluster-token "bench-$kind-$$")
    if [ "$kind" = concord ]; then
      "$CONCORD" "${args[@]}" >"$dir.log" 2>&1 &
    else
      ETCD_UNSUPPORTED_ARCH=$(uname -m) "$ETCD" "${args[@]}" >"$dir.log" 2>&1 &
    fi
    PIDS+=("$!")
  done
}

field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
round() { python3 -c 'import sys; v=float(sys.argv[1]); print(f"{v:.0f}" if v >= 100 else f"{v:.2f}")' "$1"; }

declare -A R
for kind in concord etcd; do
  start_cluster $kind
  if ! "$BENCH" --endpoints "$ENDPOINTS" --mode probe >/dev/null; then
    echo "$kind cluster did not become ready; logs:" >&2
    tail -n 30 "$WORK/$kind"/*.log >&2
    exit 1
  fi
  lat=$("$BENCH" --endpoints "$ENDPOINTS" --mode latency --ops "$OPS" --value-size "$VALUE")
  echo "$kind latency: $lat"
  thr=$("$BENCH" --endpoints "$ENDPOINTS" --mode throughput --clients "$CLIENTS" --conns "$CONNS" \
        --seconds "$SECS" --value-size "$VALUE")
  echo "$kind throughput: $thr"
  R[$kind,p50]=$(field "$lat" p50_ms)
  R[$kind,p99]=$(field "$lat" p99_ms)
  R[$kind,put_s]=$(field "$thr" puts_per_sec)
  R[$kind,tp99]=$(field "$thr" p99_ms)
  R[$kind,errors]=$(field "$thr" errors)
  stop_all
done

ratio() { python3 -c "a=float('$1'); b=float('$2'); print(f'{a/b:.2f}' if b else 'n/a')"; }
echo
echo "3-node clusters on one machine, ${VALUE}-byte values, unique keys"
echo
echo "| metric | Concord | etcd | Concord/etcd |"
echo "|---|---:|---:|---:|"
for m in p50:"1-client put p50 ms ($OPS seq. puts)" p99:"1-client put p99 ms" \
         put_s:"${CLIENTS}-client puts/s (${SECS} s, ${CONNS} conns)" tp99:"${CLIENTS}-client put p99 ms" \
         errors:"${CLIENTS}-client put errors"; do
  k=${m%%:*}; label=${m#*:}
  a=${R[concord,$k]}; b=${R[etcd,$k]}
  if [ "$k" = errors ]; then r=""; else r=$(ratio "$a" "$b"); a=$(round "$a"); b=$(round "$b"); fi
  echo "| $label | $a | $b | $r |"
done
