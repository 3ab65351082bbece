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
source "$(dirname "$0")/lib.sh"
OPS=${OPS:-2000}
CLIENTS=${CLIENTS:-1000}
CONNS=${CONNS:-48}
SECS=${SECS:-15}
VALUE=${VALUE:-256}

bench_build bench_cluster
BENCH=$EXAMPLES/bench_cluster
bench_workdir cluster-bench

declare -A R
for kind in concord etcd; do
  start_cluster $kind
  or_logs "$WORK/$kind/*.log" "$BENCH" --endpoints "$ENDPOINTS" --mode probe >/dev/null
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

echo
echo "3-node clusters on one machine, ${VALUE}-byte values, unique keys"
echo
echo "| metric | Concord | etcd | Concord/etcd |"
echo "|---|---:|---:|---:|"
for m in p50:"1-client put p50 ms ($OPS seq. puts)" p99:"1-client put p99 ms" \
         put_s:"${CLIENTS}-client puts/s (${SECS} s, ${CONNS} conns)" tp99:"${CLIENTS}-client put p99 ms" \
         errors:"${CLIENTS}-client put errors"; do
  k=${m%%:*}; label=${m#*:}
  if [ "$k" = errors ]; then
    echo "| $label | ${R[concord,$k]} | ${R[etcd,$k]} | |"
  else
    table_row "$label" "${R[concord,$k]}" "${R[etcd,$k]}"
  fi
done
