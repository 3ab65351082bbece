#!/usr/bin/env bash
# The Jepsen-style linearizability test (integration/tests/jepsen.rs), run for longer
# than in CI: 8 clients on a proxied 3-member Concord cluster while a nemesis kills,
# pauses and partitions members; the history is checked for linearizability.
#
#   scripts/jepsen.sh          # 300 s
#   scripts/jepsen.sh 1800     # 30 min
#   JEPSEN_TARGET=etcd scripts/jepsen.sh 60     # the same test against real etcd
#   JEPSEN_SEED=123 scripts/jepsen.sh           # replay a nemesis/client schedule
#   CONCORD_BIN=/path/to/concord scripts/jepsen.sh   # test that binary (no build of it)
#
# Uses cargo test, not nextest: nextest's slow-timeout (.config/nextest.toml) would
# end a run longer than 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export JEPSEN_SECS=${1:-300}
scripts/deps.sh
cargo test --workspace --test jepsen -- --nocapture
