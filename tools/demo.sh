#!/usr/bin/env bash
# The demo command of the README: set-up (idempotent), then `vfmig demo` with the given flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo build --release
exec ./target/release/vfmig demo "$@"
