#!/usr/bin/env bash
# What observability costs: put throughput of a 3-node Concord with tracing off and
# basic metrics (plain), with `--metrics extensive`, and with tracing on at 1% sampling
# (spans exported over OTLP to a port nothing listens on, so export attempts cost what
# they cost and nothing is kept), as ratios to plain. ROUNDS rounds, medians; every
# round starts fresh clusters, the variants one after the other.
#
#   bench/observability.sh                               # 100 clients, 10 s, 3 rounds
#   CLIENTS=1000 SECS=15 ROUNDS=5 bench/observability.sh
source "$(dirname "$0")/lib.sh"
CLIENTS=${CLIENTS:-100}
CONNS=${CONNS:-16}
SECS=${SECS:-10}
VALUE=${VALUE:-256}
ROUNDS=${ROUNDS:-3}

bench_build bench_cluster
BENCH=$EXAMPLES/bench_cluster
bench_workdir observability-bench
BASE=("${CONCORD_ARGS[@]}")
SINK=127.0.0.1:$(free_port)
declare -A FLAGS=(
  [plain]=""
  [extensive]="--metrics extensive"
  [traced]="--experimental-enable-distributed-tracing --experimental-distributed-tracing-address $SINK --experimental-distributed-tracing-sampling-rate 10000"
)
VARIANTS=(plain extensive traced)

for round in $(seq "$ROUNDS"); do
  for v in "${VARIANTS[@]}"; do
    read -ra extra <<<"${FLAGS[$v]}"
    CONCORD_ARGS=("${BASE[@]}" "${extra[@]}")
    WORK_ROUND=$WORK/$round-$v
    mkdir -p "$WORK_ROUND"
    WORK_SAVED=$WORK; WORK=$WORK_ROUND
    start_cluster concord
    or_logs "$WORK/concord/*.log" "$BENCH" --endpoints "$ENDPOINTS" --mode probe >/dev/null
    thr=$("$BENCH" --endpoints "$ENDPOINTS" --mode throughput --clients "$CLIENTS" --conns "$CONNS" \
          --seconds "$SECS" --value-size "$VALUE")
    echo "round $round $v: $thr"
    echo "$thr" >>"$WORK_SAVED/$v.jsonl"
    stop_all
    WORK=$WORK_SAVED
    rm -rf "$WORK_ROUND"
  done
done

plain=$(over_runs median "$WORK/plain.jsonl" puts_per_sec)
echo
echo "3-node Concord, ${CLIENTS} clients over ${CONNS} connections, ${SECS} s, ${VALUE}-byte values, median of $ROUNDS rounds"
echo
echo "| variant | puts/s | p99 ms | puts/s vs plain |"
echo "|---|---:|---:|---:|"
for v in "${VARIANTS[@]}"; do
  p=$(over_runs median "$WORK/$v.jsonl" puts_per_sec)
  l=$(over_runs median "$WORK/$v.jsonl" p99_ms)
  echo "| $v | $(round "$p") | $(round "$l") | $(ratio "$p" "$plain") |"
done
