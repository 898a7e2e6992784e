#!/usr/bin/env bash
# Builds vfmig as a static executable (glibc, crt-static) into target/static/, for places with
# no C library: the L1 guest of `vfmig vf nested-test`. With an explicit --target, RUSTFLAGS
# reach only the target's crates, not build scripts or proc macros, which must stay dynamic.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q -p vfmig --bin vfmig \
  --target x86_64-unknown-linux-gnu --target-dir "$repo/target/static"
out=$repo/target/static/x86_64-unknown-linux-gnu/release/vfmig
if readelf -l "$out" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  echo "build-static: $out is dynamically linked; it would not run in the L1 initramfs" >&2
  exit 1
fi
echo "build-static: $out" >&2
