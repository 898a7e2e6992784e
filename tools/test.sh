#!/usr/bin/env bash
# The test command of the README: set-up (idempotent), then every test, end-to-end ones
# (real QEMU, real Linux guest, real migrations) included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/build-static.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace -- "$@"
