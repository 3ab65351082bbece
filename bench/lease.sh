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
# Prints each run's JSON line, then a table with Concord, etcd and Concord/etcd.
#
#   bench/lease.sh                                     # single members, all scenarios
#   LEASES=100 CLIENTS=64 CONNS=64 SECS=10 TTL=60 bench/lease.sh
#   SCENARIOS=keepalive MEMBERS=3 bench/lease.sh       # 3-member clusters
#   CONCORD_BIN=/path/to/target/debug/concord SECS=2 bench/lease.sh   # that binary; the
#                                                      # client is built in the same profile
source "$(dirname "$0")/lib.sh"
LEASES=${LEASES:-100}
CLIENTS=${CLIENTS:-64}
CONNS=${CONNS:-$CLIENTS}
SECS=${SECS:-10}
TTL=${TTL:-60}
MEMBERS=${MEMBERS:-1}
SCENARIOS=${SCENARIOS:-keepalive grant-revoke grant-revoke-keys}
case $MEMBERS in 1 | 3) ;; *) echo "MEMBERS must be 1 or 3" >&2; exit 2 ;; esac

bench_build bench_lease
BENCH=$EXAMPLES/bench_lease
bench_workdir lease-bench

echo "lease bench: $MEMBERS-member servers, $CLIENTS clients on $CONNS connections, ${SECS} s," \
     "$LEASES leases for keepalive, TTL $TTL s; concord=$CONCORD ($PROFILE client), etcd=$ETCD"
declare -A R
for scenario in $SCENARIOS; do
  case $scenario in
    keepalive) args=(--mode keepalive --leases "$LEASES") ;;
    grant-revoke) args=(--mode grant-revoke) ;;
    grant-revoke-keys) args=(--mode grant-revoke --keys) ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  for kind in concord etcd; do
    if [ "$MEMBERS" = 1 ]; then
      start_single "$kind" "$WORK/$kind-$scenario/s1"
      ENDPOINTS=$ENDPOINT
      logs="$WORK/$kind-$scenario/*.log"
    else
      WORK_KIND=$kind-$scenario
      start_cluster "$WORK_KIND"
      logs="$WORK/$WORK_KIND/*.log"
    fi
    or_logs "$logs" "$BENCH" --endpoints "$ENDPOINTS" --probe >/dev/null
    out=$(or_logs "$logs" "$BENCH" --endpoints "$ENDPOINTS" "${args[@]}" --clients "$CLIENTS" \
            --conns "$CONNS" --seconds "$SECS" --ttl "$TTL")
    echo "$kind $scenario: $out"
    R[$kind,$scenario]=$out
    stop_all
  done
done

echo
spread=""
if [ "$MEMBERS" = 3 ]; then spread=" spread over the 3 members"; fi
echo "$MEMBERS-member servers on one machine; $CLIENTS clients on $CONNS connections$spread," \
     "${SECS} s per measured phase; TTL $TTL s"
echo
echo "| scenario | metric | Concord | etcd | Concord/etcd |"
echo "|---|---|---:|---:|---:|"
for scenario in $SCENARIOS; do
  c=${R[concord,$scenario]}; e=${R[etcd,$scenario]}
  if [ "$scenario" = keepalive ]; then
    metrics=(renewals_per_sec:"renewals/s ($LEASES leases)" p50_ms:"renewal p50 ms" p99_ms:"renewal p99 ms")
    checks=(ttl_nonpositive wrong_id errors)
  else
    metrics=(grants_per_sec:"grants/s" grant_p50_ms:"grant p50 ms" grant_p99_ms:"grant p99 ms"
             revokes_per_sec:"revokes/s" revoke_p50_ms:"revoke p50 ms" revoke_p99_ms:"revoke p99 ms")
    checks=(grants revoke_not_found keys_left leases_left grant_errors revoke_errors)
  fi
  for m in "${metrics[@]}"; do
    table_row "$scenario | ${m#*:}" "$(field "$c" "${m%%:*}")" "$(field "$e" "${m%%:*}")"
  done
  cc=""; ec=""
  for k in "${checks[@]}"; do
    cc+="${cc:+ / }$(field "$c" "$k")"; ec+="${ec:+ / }$(field "$e" "$k")"
  done
  echo "| $scenario | checks: ${checks[*]} | $cc | $ec | |"
done
