#!/usr/bin/env bash
# The simulation tier: seeded scenarios of whole Concord members in one process under
# fault schedules, judged by the history and watch checkers.
#   scripts/sim.sh --seeds N [--base B] [--jobs J] [--faults Kind,...]
#   scripts/sim.sh --seed S                   # replay one failing seed
#   scripts/sim.sh --plant bug_read_without_read_index --seeds 200 --until-violation
# Builds `concord-sim` (with failpoints when --plant is given) and runs it; the last
# line is exactly `N seeds, V violations`.
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
for a in "$@"; do
  [ "$a" = "--plant" ] && features=(--features concord-integration/failpoints)
done
cargo build --quiet --workspace --bin concord-sim "${features[@]}"
exec "${CARGO_TARGET_DIR:-target}/debug/concord-sim" "$@"
