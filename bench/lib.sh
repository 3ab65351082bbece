# Shell shared by the bench scripts (watch.sh, cluster.sh, lease.sh, load_restart.sh);
# sourced, not run. Sourcing it turns on strict mode, moves to the repository root and
# sets ETCD (the reference etcd: $ETCD_BIN or Debian's) and CARGO_TARGET_DIR (default
# ~/.cache/concord-release). Servers run on loopback ports picked by the OS, one data
# directory each under a temp dir, and are killed (by pid) when the script exits.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
TARGET_DIR_GIVEN=${CARGO_TARGET_DIR:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/concord-release}
# Extra server arguments, from $CONCORD_FLAGS / $ETCD_FLAGS (split on blanks) and the
# scripts themselves (e.g. a larger etcd backend quota).
read -ra CONCORD_ARGS <<<"${CONCORD_FLAGS:-}"
read -ra ETCD_ARGS <<<"${ETCD_FLAGS:-}"
PIDS=()
WORK=""

# bench_build EXAMPLE...: installs what is missing (scripts/deps.sh), then builds the
# benchmark clients and, without $CONCORD_BIN, the release `concord`. Sets CONCORD (the
# server binary), PROFILE and EXAMPLES (where the clients are). The clients are built
# in the profile and (unless CARGO_TARGET_DIR is set) the target dir the concord binary
# comes from (<target>/<profile>/concord); a binary outside a cargo target dir, or none
# given, means release. `--workspace` keeps the feature set the same as every other
# build of the workspace, so nothing (RocksDB above all) is rebuilt for these targets.
bench_build() {
  scripts/deps.sh
  PROFILE=release
  if [ -n "${CONCORD_BIN:-}" ]; then
    local d
    d=$(dirname "$CONCORD_BIN")
    if [ -d "$d/.fingerprint" ]; then
      PROFILE=$(basename "$d")
      if [ -z "$TARGET_DIR_GIVEN" ]; then CARGO_TARGET_DIR=$(dirname "$d"); fi
    fi
  fi
  local pflag=() targets=() e
  case $PROFILE in
    debug) ;;
    release) pflag=(--release) ;;
    *) pflag=(--profile "$PROFILE") ;;
  esac
  for e in "$@"; do targets+=(--example "$e"); done
  if [ -n "${CONCORD_BIN:-}" ]; then
    cargo build --quiet "${pflag[@]}" --workspace "${targets[@]}"
    CONCORD=$CONCORD_BIN
  else
    cargo build --quiet "${pflag[@]}" --workspace --bin concord "${targets[@]}"
    CONCORD=$CARGO_TARGET_DIR/$PROFILE/concord
  fi
  EXAMPLES=$CARGO_TARGET_DIR/$PROFILE/examples
}

# bench_workdir NAME: a fresh temp dir in WORK; on exit every server is killed and the
# dir removed.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/concord-$1.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}
bench_cleanup() {
  stop_all
  if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_member KIND NAME DIR CLIENT_URL PEER_URL CLUSTER: one concord or etcd member in
# the background, output appended to DIR.log; its pid in PID and added to PIDS. On a
# restart (DIR already has data) both servers ignore the --initial-cluster flags.
start_member() {
  local kind=$1 name=$2 dir=$3 c=$4 p=$5 cluster=$6
  local args=(--name "$name" --data-dir "$dir" --listen-client-urls "$c" --advertise-client-urls "$c"
              --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "$cluster"
              --initial-cluster-state new --initial-cluster-token "bench-$kind-$$")
  mkdir -p "$(dirname "$dir")"
  if [ "$kind" = concord ]; then
    "$CONCORD" "${args[@]}" "${CONCORD_ARGS[@]}" >>"$dir.log" 2>&1 &
  else
    ETCD_UNSUPPORTED_ARCH=$(uname -m) "$ETCD" "${args[@]}" "${ETCD_ARGS[@]}" >>"$dir.log" 2>&1 &
  fi
  PID=$!
  PIDS+=("$PID")
}

# start_single KIND DIR [CLIENT_URL PEER_URL]: a single member (on new free ports unless
# given, e.g. to restart on the same ones); sets PID, ENDPOINT and PEER.
start_single() {
  local kind=$1 dir=$2
  ENDPOINT=${3:-http://127.0.0.1:$(free_port)}
  PEER=${4:-http://127.0.0.1:$(free_port)}
  start_member "$kind" s1 "$dir" "$ENDPOINT" "$PEER" "s1=$PEER"
}

# start_cluster KIND: a fresh 3-member cluster in $WORK/KIND/n1..n3; sets ENDPOINTS
# (comma-separated client URLs).
start_cluster() {
  local kind=$1 i cluster="" cports=() pports=()
  for i in 1 2 3; do
    cports+=("$(free_port)"); pports+=("$(free_port)")
    cluster+="${cluster:+,}n$i=http://127.0.0.1:${pports[i-1]}"
  done
  ENDPOINTS=""
  for i in 1 2 3; do
    local c="http://127.0.0.1:${cports[i-1]}"
    ENDPOINTS+="${ENDPOINTS:+,}$c"
    start_member "$kind" "n$i" "$WORK/$kind/n$i" "$c" "http://127.0.0.1:${pports[i-1]}" "$cluster"
  done
}

# stop_all: SIGKILL every server started here and reap it.
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# stop_gently PID: SIGTERM one server and wait until it has exited (it holds its data
# dir and ports until then).
stop_gently() {
  local p keep=()
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# or_logs LOGS CMD...: runs CMD; if it fails, prints the tail of the server logs LOGS
# (a glob) to stderr and fails.
or_logs() {
  local logs=$1
  shift
  if "$@"; then return 0; fi
  echo "failed: $*; server log(s):" >&2
  # shellcheck disable=SC2086 # LOGS is a glob
  tail -n 30 $logs >&2
  return 1
}

# field JSON NAME: one field of a JSON line.
field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1])[sys.argv[2]]; print("n/a" if v is None else v)' "$1" "$2"; }

# over_runs median|sum FILE NAME: the median or the sum of field NAME over the JSON
# lines of FILE (one line per run; a field that is null in every run gives "n/a").
over_runs() {
  python3 - "$@" <<'PY'
import json, statistics, sys
how, path, name = sys.argv[1:]
vals = [v for v in (json.loads(l)[name] for l in open(path) if l.strip()) if v is not None]
if not vals:
    print("n/a")
elif how == "sum":
    print(sum(vals))
else:
    print(statistics.median(vals))
PY
}

# round V: 3 significant-ish digits (no decimals from 100 up, 2 below).
round() { python3 -c 'import sys; v=float(sys.argv[1]); print(f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}")' "$1"; }

# ratio A B: A/B with 2 decimals ("n/a" when B is 0).
ratio() { python3 -c 'import sys; a, b = map(float, sys.argv[1:]); print(f"{a/b:.2f}" if b else "n/a")' "$1" "$2"; }

# table_row LABEL A B: a markdown row "| LABEL | A | B | A/B |" with the numbers rounded.
table_row() { echo "| $1 | $(round "$2") | $(round "$3") | $(ratio "$2" "$3") |"; }
