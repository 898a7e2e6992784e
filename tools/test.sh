#!/usr/bin/env bash
# The test command of the README: set-up (idempotent), then every test, end-to-end ones
# (real QEMU, real Linux guest, real migrations) included: the `e2e` feature turns them on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/build-static.sh
cargo build --release --workspace --all-targets --features e2e
cargo test --release --workspace --features e2e -- "$@"
