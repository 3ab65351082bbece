#!/usr/bin/env bash
# Lease benchmark: Concord and real etcd on this machine (loopback, separate temp data
# dirs, one server at a time, a fresh server for every scenario), driven by the same
# client (integration/examples/bench_lease.rs). Scenarios:
#   keepalive          C clients renewing L leases over LeaseKeepAlive streams, one
#                      renewal in flight per client, for SECS: renewals/s, p50/p99
#   grant-revoke       C clients granting leases (TTL) for SECS: grants/s, p50/p99; then
#                      revoking all of them: revokes/s, p50/p99
#   grant-revoke-keys  the same with one key put with each lease before the revokes, so
#                      every revoke also deletes a key
# Prints each run's JSON line, then a table with Concord, etcd and Concord/etcd. With
# REPS=n every scenario runs n times (Concord and etcd alternating, a fresh server each
# time) and the table shows each metric's median over the n runs (checks: the sums), so
# a burst of other work on the machine moves one run, not the figure.
#
#   bench/lease.sh                                     # single members, all scenarios
#   LEASES=100 CLIENTS=64 CONNS=64 SECS=10 TTL=60 bench/lease.sh
#   SCENARIOS=keepalive MEMBERS=3 bench/lease.sh       # 3-member clusters
#   REPS=3 bench/lease.sh                              # medians of 3 runs each
#   CONCORD_BIN=/path/to/target/debug/concord SECS=2 bench/lease.sh   # that binary; the
#                                                      # client is built in the same profile
source "$(dirname "$0")/lib.sh"
LEASES=${LEASES:-100}
CLIENTS=${CLIENTS:-64}
CONNS=${CONNS:-$CLIENTS}
SECS=${SECS:-10}
TTL=${TTL:-60}
MEMBERS=${MEMBERS:-1}
REPS=${REPS:-1}
SCENARIOS=${SCENARIOS:-keepalive grant-revoke grant-revoke-keys}
case $MEMBERS in 1 | 3) ;; *) echo "MEMBERS must be 1 or 3" >&2; exit 2 ;; esac

bench_build bench_lease
BENCH=$EXAMPLES/bench_lease
bench_workdir lease-bench

echo "lease bench: $MEMBERS-member servers, $CLIENTS clients on $CONNS connections, ${SECS} s," \
     "$LEASES leases for keepalive, TTL $TTL s; concord=$CONCORD ($PROFILE client), etcd=$ETCD"
for scenario in $SCENARIOS; do
  case $scenario in
    keepalive) args=(--mode keepalive --leases "$LEASES") ;;
    grant-revoke) args=(--mode grant-revoke) ;;
    grant-revoke-keys) args=(--mode grant-revoke --keys) ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  for rep in $(seq "$REPS"); do
    for kind in concord etcd; do
      run=$kind-$scenario-$rep
      if [ "$MEMBERS" = 1 ]; then
        start_single "$kind" "$WORK/$run/s1"
        ENDPOINTS=$ENDPOINT
      else
        start_cluster "$run"
      fi
      logs="$WORK/$run/*.log"
      or_logs "$logs" "$BENCH" --endpoints "$ENDPOINTS" --probe >/dev/null
      out=$(or_logs "$logs" "$BENCH" --endpoints "$ENDPOINTS" "${args[@]}" --clients "$CLIENTS" \
              --conns "$CONNS" --seconds "$SECS" --ttl "$TTL")
      echo "$kind $scenario run $rep: $out"
      echo "$out" >>"$WORK/$kind-$scenario.jsonl"
      stop_all
    done
  done
done

echo
spread=""
if [ "$MEMBERS" = 3 ]; then spread=" spread over the 3 members"; fi
reps=""
if [ "$REPS" != 1 ]; then reps=" (sums of $REPS runs)"; fi
echo "$MEMBERS-member servers on one machine; $CLIENTS clients on $CONNS connections$spread," \
     "${SECS} s per measured phase; TTL $TTL s; medians of $REPS run(s) per server"
echo
echo "| scenario | metric | Concord | etcd | Concord/etcd |"
echo "|---|---|---:|---:|---:|"
for scenario in $SCENARIOS; do
  c=$WORK/concord-$scenario.jsonl; e=$WORK/etcd-$scenario.jsonl
  if [ "$scenario" = keepalive ]; then
    metrics=(renewals_per_sec:"renewals/s ($LEASES leases)" p50_ms:"renewal p50 ms" p99_ms:"renewal p99 ms")
    checks=(ttl_nonpositive wrong_id errors)
  else
    metrics=(grants_per_sec:"grants/s" grant_p50_ms:"grant p50 ms" grant_p99_ms:"grant p99 ms"
             revokes_per_sec:"revokes/s" revoke_p50_ms:"revoke p50 ms" revoke_p99_ms:"revoke p99 ms")
    checks=(grants revoke_not_found keys_left leases_left grant_errors revoke_errors)
  fi
  for m in "${metrics[@]}"; do
    table_row "$scenario | ${m#*:}" "$(over_runs median "$c" "${m%%:*}")" "$(over_runs median "$e" "${m%%:*}")"
  done
  cc=""; ec=""
  for k in "${checks[@]}"; do
    cc+="${cc:+ / }$(over_runs sum "$c" "$k")"; ec+="${ec:+ / }$(over_runs sum "$e" "$k")"
  done
  echo "| $scenario | checks$reps: ${checks[*]} | $cc | $ec | |"
done
