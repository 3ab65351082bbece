#!/usr/bin/env bash
# The whole test suite: installs what it needs, lints, builds, and runs every test
# (unit, conformance against real clients, differential against real etcd, crash,
# robustness scenarios on the failpoint build, which the robustness test builds itself:
# `--features concord-server/failpoints` recompiles four crates, never RocksDB; and the
# simulation tier: 20 seeded in-process scenarios, plus the planted-bug hunts on the
# failpoint build of `concord-sim`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --quiet --features concord-server/failpoints,concord-integration/failpoints -- -D warnings
cargo build --workspace --all-targets --quiet
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
