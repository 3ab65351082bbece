#!/usr/bin/env bash
# Loads N keys into concord and into real etcd (same load generator, same machine, same
# run), then reports load throughput, memory, disk size and restart time of each, and
# concord/etcd ratios.
#
#   bench/load_restart.sh                 # 1,000,000 keys, 64 clients, 256-byte values
#   N=100000 CLIENTS=32 VALUE=128 bench/load_restart.sh
#   CONCORD_BIN=/path/to/target/debug/concord N=1000 bench/load_restart.sh  # smoke run
source "$(dirname "$0")/lib.sh"
N=${N:-1000000}
CLIENTS=${CLIENTS:-64}
VALUE=${VALUE:-256}
ETCD_ARGS+=(--quota-backend-bytes=$((8*1024*1024*1024)))

bench_build bench_load
LOAD=$EXAMPLES/bench_load
bench_workdir bench

rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

declare -A R
for kind in concord etcd; do
  dir=$WORK/$kind
  start_single "$kind" "$dir"
  or_logs "$dir.log" "$LOAD" --endpoint "$ENDPOINT" --probe >/dev/null
  out=$("$LOAD" --endpoint "$ENDPOINT" --keys "$N" --clients "$CLIENTS" --value-size "$VALUE")
  echo "$kind load: $out"
  R[$kind,put_s]=$(echo "$out" | awk '{print $6}')
  R[$kind,p99]=$(echo "$out" | awk '{print $10}')
  R[$kind,rss_loaded]=$(rss_mb "$PID")
  stop_gently "$PID"
  R[$kind,disk_mb]=$(du -sm "$dir" | awk '{print $1}')
  t0=$(date +%s.%N)
  start_single "$kind" "$dir" "$ENDPOINT" "$PEER"
  or_logs "$dir.log" "$LOAD" --endpoint "$ENDPOINT" --probe >/dev/null
  t1=$(date +%s.%N)
  R[$kind,restart_s]=$(python3 -c "print(round($t1 - $t0, 3))")
  R[$kind,rss_restart]=$(rss_mb "$PID")
  "$LOAD" --endpoint "$ENDPOINT" --verify --keys "$N" >/dev/null
  stop_gently "$PID"
done

printf '\n%-26s %12s %12s %16s\n' "metric ($N keys, ${VALUE}B)" concord etcd "concord/etcd"
for m in put_s:"puts/s (${CLIENTS} clients)" p99:"put p99 ms" rss_loaded:"RSS after load MB" disk_mb:"on disk MB" restart_s:"restart to first read s" rss_restart:"RSS after restart MB"; do
  k=${m%%:*}; label=${m#*:}
  printf '%-26s %12s %12s %16s\n' "$label" "${R[concord,$k]}" "${R[etcd,$k]}" "$(ratio "${R[concord,$k]}" "${R[etcd,$k]}")"
done
