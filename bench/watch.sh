#!/usr/bin/env bash
# Watch benchmark: a single-member Concord and a single-member real etcd on this machine
# (loopback, separate temp data dirs, one server at a time, a fresh server for every
# scenario), driven by the same client (integration/examples/bench_watch.rs). For N
# watchers on one key and N watchers on N distinct keys: server RSS before and after
# creating the watchers -> bytes per watcher, and put-to-event latency p50/p99. Prints
# each run's JSON line, then a table with Concord, etcd and Concord/etcd.
#
#   bench/watch.sh                                     # 10,000 watchers, 200 puts
#   N=1000 PUTS=50 bench/watch.sh                      # quick smoke run
#   N=10000 PUTS=300 STREAMS=100 CONNS=10 GAP_MS=20 SCENARIOS="one distinct" bench/watch.sh
#   CONCORD_BIN=/path/to/target/debug/concord bench/watch.sh   # that binary; the client
#                                                      # is built in the same profile
source "$(dirname "$0")/lib.sh"
N=${N:-10000}
PUTS=${PUTS:-200}
STREAMS=${STREAMS:-100}
CONNS=${CONNS:-$STREAMS}
GAP_MS=${GAP_MS:-20}
SETTLE_MS=${SETTLE_MS:-1000}
SCENARIOS=${SCENARIOS:-one distinct}

bench_build bench_watch
BENCH=$EXAMPLES/bench_watch
bench_workdir watch-bench

echo "watch bench: N=$N watchers over $STREAMS streams on $CONNS connections, $PUTS puts" \
     "(gap ${GAP_MS} ms), concord=$CONCORD ($PROFILE client), etcd=$ETCD"
for scenario in $SCENARIOS; do
  for kind in concord etcd; do
    dir=$WORK/$kind-$scenario
    start_single "$kind" "$dir"
    or_logs "$dir.log" "$BENCH" --endpoint "$ENDPOINT" --probe >/dev/null
    out=$(or_logs "$dir.log" "$BENCH" --endpoint "$ENDPOINT" --pid "$PID" --scenario "$scenario" \
            --watchers "$N" --streams "$STREAMS" --conns "$CONNS" --puts "$PUTS" \
            --gap-ms "$GAP_MS" --settle-ms "$SETTLE_MS")
    echo "$kind $scenario: $out"
    echo "$out" >"$WORK/$kind-$scenario.json"
    stop_all
  done
done

echo
python3 - "$WORK" "$N" "$SCENARIOS" <<'EOF'
import json, sys
work, n, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
label = {"one": "one key", "distinct": "distinct keys"}
def fmt(v):
    if v is None: return "n/a"
    if isinstance(v, int): return str(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"
mb = lambda kib: None if kib is None else kib / 1024
rows = [
    ("RSS before watchers, MB", lambda r: mb(r["rss_before_kib"]), True),
    ("RSS after watchers, MB", lambda r: mb(r["rss_after_kib"]), True),
    ("bytes per watcher", lambda r: r["bytes_per_watcher"], True),
    ("time to create all watchers, s", lambda r: r["create_secs"], True),
    ("put-to-event p50, ms (every event)", lambda r: r["event_p50_ms"], True),
    ("put-to-event p99, ms (every event)", lambda r: r["event_p99_ms"], True),
    ("put-to-last-watcher p50, ms (per put)", lambda r: r["last_p50_ms"], True),
    ("put-to-last-watcher p99, ms (per put)", lambda r: r["last_p99_ms"], True),
    ("events missing / out of order / cancelled", lambda r:
        f'{r["events_missing"]} / {r["out_of_order"]} / {r["watchers_canceled"]}', False),
]
r0 = json.load(open(f"{work}/concord-{scenarios[0]}.json"))
print(f'{r0["streams"]} watch streams on {r0["conns"]} connections, {r0["puts"]} puts '
      f'spaced by fan-out + {r0["gap_ms"]} ms; single-member servers')
print()
print("| watchers | scenario | metric | Concord | etcd | Concord/etcd |")
print("|---:|---|---|---:|---:|---:|")
for s in scenarios:
    c = json.load(open(f"{work}/concord-{s}.json"))
    e = json.load(open(f"{work}/etcd-{s}.json"))
    for name, get, numeric in rows:
        if s == "distinct" and "last-watcher" in name:
            continue  # one event per put: the same as the every-event figures
        a, b = get(c), get(e)
        if numeric:
            print(f"| {n} | {label.get(s, s)} | {name} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
        else:
            print(f"| {n} | {label.get(s, s)} | {name} | {a} | {b} | |")
EOF
