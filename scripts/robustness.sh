#!/usr/bin/env bash
# Robustness scenarios (integration/tests/robustness.rs) beyond the short CI run:
# each run starts a 1- or 3-member cluster of the failpoint build, runs mixed client
# traffic and watchers, injects one random fault (kill -9, failpoint crash, pause,
# partition, peer delay / drop, blackhole until snapshot, member replacement) and
# checks the KV history and the watch guarantees.
#
#   scripts/robustness.sh --runs 20            # 20 runs
#   scripts/robustness.sh --runs 5 --secs 30   # longer traffic per run
#   ROBUSTNESS_SEED=123 scripts/robustness.sh  # replay a printed seed
#
# A failed run keeps its data directories, logs and history under $TMPDIR.
# Uses cargo test, not nextest: nextest's slow-timeout would end a long run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=10
secs=12
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--secs S]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh
ROBUSTNESS_RUNS=$runs ROBUSTNESS_SECS=$secs \
  cargo test --workspace --test robustness -- --nocapture
