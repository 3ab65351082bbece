#!/usr/bin/env bash
# Builds (release) and starts a single-member concord with etcd's defaults: clients on
# http://localhost:2379, data in ./default.concord. Extra arguments go to concord.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --workspace --bin concord
exec "${CARGO_TARGET_DIR:-target}/release/concord" "$@"
