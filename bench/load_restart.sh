#!/usr/bin/env bash
# Loads N keys into concord and into real etcd (same load generator, same machine, same
# run), then reports load throughput, memory, disk size and restart time of each, and
# concord/etcd ratios.
#
#   bench/load_restart.sh                 # 1,000,000 keys, 64 clients, 256-byte values
#   N=100000 CLIENTS=32 VALUE=128 bench/load_restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
CLIENTS=${CLIENTS:-64}
VALUE=${VALUE:-256}
scripts/deps.sh
cargo build --release --quiet --workspace --bin concord --example bench_load
T=${CARGO_TARGET_DIR:-target}/release
LOAD=$T/examples/bench_load
WORK=$(mktemp -d /tmp/concord-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

start_server() { # kind dir port peer -> pid
  local kind=$1 dir=$2 port=$3 peer=$4
  local c="http://127.0.0.1:$port" p="http://127.0.0.1:$peer"
  local args=(--name b1 --data-dir "$dir" --listen-client-urls "$c" --advertise-client-urls "$c"
              --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "b1=$p")
  if [ "$kind" = concord ]; then
    "$T/concord" "${args[@]}" >>"$dir.log" 2>&1 &
  else
    ETCD_UNSUPPORTED_ARCH=$(uname -m) etcd "${args[@]}" --quota-backend-bytes=$((8*1024*1024*1024)) >>"$dir.log" 2>&1 &
  fi
  echo $!
}

# start_server runs in a command substitution, so its server is not this shell's child
# and `wait` cannot wait for it: poll until the process is gone (it holds the data dir
# and the ports until then).
stop_server() { kill -TERM "$1" 2>/dev/null || true; while kill -0 "$1" 2>/dev/null; do sleep 0.1; done; }

declare -A R
for kind in concord etcd; do
  dir=$WORK/$kind; port=$(free_port); peer=$(free_port)
  pid=$(start_server $kind "$dir" "$port" "$peer"); PIDS+=("$pid")
  "$LOAD" --endpoint "http://127.0.0.1:$port" --probe >/dev/null
  out=$("$LOAD" --endpoint "http://127.0.0.1:$port" --keys "$N" --clients "$CLIENTS" --value-size "$VALUE")
  echo "$kind load: $out"
  R[$kind,put_s]=$(echo "$out" | awk '{print $6}')
  R[$kind,p99]=$(echo "$out" | awk '{print $10}')
  R[$kind,rss_loaded]=$(rss_mb "$pid")
  stop_server "$pid"
  R[$kind,disk_mb]=$(du -sm "$dir" | awk '{print $1}')
  t0=$(date +%s.%N)
  pid=$(start_server $kind "$dir" "$port" "$peer"); PIDS+=("$pid")
  "$LOAD" --endpoint "http://127.0.0.1:$port" --probe >/dev/null
  t1=$(date +%s.%N)
  R[$kind,restart_s]=$(python3 -c "print(round($t1 - $t0, 3))")
  R[$kind,rss_restart]=$(rss_mb "$pid")
  "$LOAD" --endpoint "http://127.0.0.1:$port" --verify --keys "$N" >/dev/null
  stop_server "$pid"
done

ratio() { python3 -c "a=float('$1'); b=float('$2'); print(f'{a/b:.2f}' if b else 'n/a')"; }
printf '\n%-26s %12s %12s %16s\n' "metric ($N keys, ${VALUE}B)" concord etcd "concord/etcd"
for m in put_s:"puts/s (${CLIENTS} clients)" p99:"put p99 ms" rss_loaded:"RSS after load MB" disk_mb:"on disk MB" restart_s:"restart to first read s" rss_restart:"RSS after restart MB"; do
  k=${m%%:*}; label=${m#*:}
  printf '%-26s %12s %12s %16s\n' "$label" "${R[concord,$k]}" "${R[etcd,$k]}" "$(ratio "${R[concord,$k]}" "${R[etcd,$k]}")"
done
