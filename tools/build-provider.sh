#!/usr/bin/env bash
# Builds the libfabric provider (provider/, crate vfmig-fi) and installs it under the name
# libfabric looks for: DIR/libvfmig-fi.so (default DIR: target/fi). cargo names a cdylib after
# its lib name, libvfmig_fi.so, and a lib name cannot contain '-': so the copy renames it.
# Then:  FI_PROVIDER_PATH=DIR fi_info -p vfmig
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/target/fi}
cd "$repo"
cargo build --release -q -p vfmig-fi
mkdir -p "$dir"
install -m 0755 "$repo/target/release/libvfmig_fi.so" "$dir/libvfmig-fi.so"
echo "build-provider: $dir/libvfmig-fi.so (FI_PROVIDER_PATH=$dir fi_info -p vfmig)" >&2
