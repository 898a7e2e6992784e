#!/usr/bin/env bash
# vfmig set-up: everything the demo and the tests need on a fresh Debian 12 machine.
#   - QEMU 10.0.x (qemu-system-x86) from bookworm-backports, busybox-static, cpio, iproute2
#   - a Debian guest kernel (cloud flavour), unpacked
#   - the guest initramfs: busybox, the virtio-net modules, vfmig's init and guest binaries
# Idempotent: what it fetched is cached under $VFMIG_CACHE (default: <repo>/.cache).
# Run as root (apt-get). Safe to run again; it does only what is missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${VFMIG_CACHE:-$repo/.cache}
mkdir -p "$cache"
log() { printf 'setup: %s\n' "$*" >&2; }

# ---- 1. host packages -------------------------------------------------------
need_pkgs=()
qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 &&
    qemu-system-x86_64 --version | head -1 | grep -Eq 'version (10\.|[1-9][1-9]\.)'
}
qemu_ok || need_pkgs+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v zstd >/dev/null 2>&1 || need_pkgs+=(zstd)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "need root to install: ${need_pkgs[*]}"; exit 1; }
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports to apt's sources"
    cat > /etc/apt/sources.list.d/vfmig-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  log "apt-get update"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  log "installing ${need_pkgs[*]}"
  # qemu-system-x86 comes from backports (10.0.x); the rest from the main suite.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports "${need_pkgs[@]}" >/dev/null
  touch "$cache/.apt-updated"
fi
qemu_ok || { log "qemu-system-x86_64 10.x is not installed"; exit 1; }

# ---- 2. guest kernel --------------------------------------------------------
kdir=$cache/kernel
if [ ! -e "$kdir/.done" ]; then
  [ -e "$cache/.apt-updated" ] || { DEBIAN_FRONTEND=noninteractive apt-get update -qq; touch "$cache/.apt-updated"; }
  # newest cloud kernel image package that apt knows of
  # Default: the newest 6.1 cloud kernel of bookworm (the one the design facts were verified on).
  default_pattern='^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64$'
  pattern=${VFMIG_GUEST_KERNEL_PATTERN:-$default_pattern}
  pkg=$(apt-cache search --names-only "$pattern" | awk '{print $1}' |
        grep -v -- '-dbg' | sort -V | tail -1)
  [ -n "$pkg" ] || { log "no linux-image-*-cloud-amd64 package found"; exit 1; }
  log "fetching guest kernel $pkg"
  rm -rf "$kdir"; mkdir -p "$kdir/deb"
  # apt's sandbox user cannot write the cache; download as root without the warning.
  (cd "$kdir/deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
  dpkg -x "$kdir"/deb/*.deb "$kdir/root"
  ver=$(ls "$kdir/root/lib/modules" | head -1)
  cp "$kdir/root/boot/vmlinuz-$ver" "$kdir/vmlinuz"
  echo "$ver" > "$kdir/version"
  touch "$kdir/.done"
fi
kver=$(cat "$kdir/version")

# ---- 3. guest initramfs -----------------------------------------------------
# The guest binaries (static) are built by cargo when the guest crate exists.
initrd=$cache/initramfs.cpio.gz
guest_bins=(vfmig-agent lu-lite rdma-bw rdma-lat vf-probe)
guest_hash=none
if [ -f "$repo/guest/Cargo.toml" ]; then
  # the sources of the guest crate and of the protocol crate it uses
  guest_hash=$(cd "$repo" && find guest proto -type f \( -name '*.rs' -o -name '*.toml' -o -name '*.h' \) \
                 -not -path '*/target/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
fi
stamp_src=$({ cat "$repo/tools/guest-init.sh" "$0"; echo "guest $guest_hash"; } | sha256sum | cut -c1-16)
if [ ! -e "$initrd" ] || [ "$(cat "$cache/initramfs.stamp" 2>/dev/null)" != "$stamp_src" ]; then
  log "building guest initramfs (kernel $kver)"
  stage=$cache/initramfs.stage
  rm -rf "$stage"; mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,root,etc,lib/modules}
  cp /bin/busybox "$stage/bin/busybox"
  for a in sh mount umount insmod ip cat echo sleep ls poweroff mkdir dmesg uname seq; do
    ln -sf busybox "$stage/bin/$a"
  done
  # modules for virtio-net, in dependency order, read from each module's depends=
  moddir=$kdir/root/lib/modules/$kver
  mods=$(python3 "$repo/tools/module-order.py" "$moddir" virtio_net virtio_pci)
  : > "$stage/etc/modules.order"
  for m in $mods; do
    src=$(find "$moddir" -name "$m.ko*" | head -1)
    [ -n "$src" ] || { log "module $m not found in $moddir"; exit 1; }
    case "$src" in
      *.ko.xz)  xz -dc "$src"  > "$stage/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$src" > "$stage/lib/modules/$m.ko" ;;
      *.ko.gz)  gzip -dc "$src" > "$stage/lib/modules/$m.ko" ;;
      *)        cp "$src" "$stage/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$stage/etc/modules.order"
  done
  cp "$repo/tools/guest-init.sh" "$stage/init"; chmod +x "$stage/init"
  if [ "$guest_hash" != none ]; then
    # Static, so that they run on the busybox initramfs. With an explicit --target, RUSTFLAGS
    # reach only the target's crates (not build scripts or proc macros).
    cargo=${CARGO:-cargo}
    command -v "$cargo" >/dev/null 2>&1 || { log "cargo not found (set CARGO=/path/to/cargo)"; exit 1; }
    log "building the static guest binaries: ${guest_bins[*]}"
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --release -q \
        -p vfmig-guest --bins --target x86_64-unknown-linux-gnu --target-dir "$repo/target/guest")
    gout=$repo/target/guest/x86_64-unknown-linux-gnu/release
    for b in "${guest_bins[@]}"; do
      [ -f "$gout/$b" ] || { log "guest binary $gout/$b was not built"; exit 1; }
      if readelf -l "$gout/$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        log "guest binary $b is dynamically linked; it would not run in the initramfs"; exit 1
      fi
      install -m 0755 "$gout/$b" "$stage/bin/$b"
    done
  fi
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  echo "$stamp_src" > "$cache/initramfs.stamp"
fi
log "ready: kernel $kdir/vmlinuz ($kver), initramfs $initrd, $(qemu-system-x86_64 --version | head -1)"
