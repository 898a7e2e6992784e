#!/usr/bin/env bash
# vfmig set-up: everything the demo and the tests need on a fresh Debian 12 machine.
#   - QEMU 10.0.x (qemu-system-x86) from bookworm-backports, busybox-static, cpio, iproute2
#   - libvirt 11.x (libvirtd with its QEMU driver, virsh) from bookworm-backports, for the test
#     that migrates with `virsh` (no libvirt service is enabled: the tests start their own)
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
libvirt_ok() {
  [ -x /usr/sbin/libvirtd ] && command -v virsh >/dev/null 2>&1 &&
    virsh --version | grep -Eq '^(1[1-9]|[2-9][0-9])\.'
}
libvirt_ok || need_pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)

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
  # qemu-system-x86 (10.0.x) and libvirt (11.x) come from backports; the rest from the main
  # suite.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports "${need_pkgs[@]}" >/dev/null
  touch "$cache/.apt-updated"
fi
qemu_ok || { log "qemu-system-x86_64 10.x is not installed"; exit 1; }
libvirt_ok || { log "libvirt 11.x (libvirtd, virsh) is not installed"; exit 1; }

# ---- 2. guest kernels ---------------------------------------------------------
# fetch_kernel DIR PATTERN: the newest package apt knows whose name matches PATTERN, unpacked
# into DIR/root, with DIR/vmlinuz and DIR/version.
fetch_kernel() {
  local dir=$1 pattern=$2 pkg ver
  [ -e "$dir/.done" ] && return 0
  [ -e "$cache/.apt-updated" ] || { DEBIAN_FRONTEND=noninteractive apt-get update -qq; touch "$cache/.apt-updated"; }
  pkg=$(apt-cache search --names-only "$pattern" | awk '{print $1}' |
        grep -v -- '-dbg' | sort -V | tail -1)
  [ -n "$pkg" ] || { log "no kernel package matching $pattern found"; exit 1; }
  log "fetching kernel $pkg"
  rm -rf "$dir"; mkdir -p "$dir/deb"
  # apt's sandbox user cannot write the cache; download as root without the warning.
  (cd "$dir/deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
  dpkg -x "$dir"/deb/*.deb "$dir/root"
  rm -rf "$dir/deb"
  ver=$(ls "$dir/root/lib/modules" | head -1)
  cp "$dir/root/boot/vmlinuz-$ver" "$dir/vmlinuz"
  echo "$ver" > "$dir/version"
  touch "$dir/.done"
}
# The test guests: the newest 6.1 cloud kernel of bookworm (the one the design facts were
# verified on).
kdir=$cache/kernel
fetch_kernel "$kdir" "${VFMIG_GUEST_KERNEL_PATTERN:-^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64\$}"
kver=$(cat "$kdir/version")
# The nested VFIO test's L1 guest: the generic flavour, which has igb, vfio-pci and the IOMMU.
gkdir=$cache/kernel-generic
fetch_kernel "$gkdir" "${VFMIG_L1_KERNEL_PATTERN:-^linux-image-6\.1\.[0-9]+-[0-9]+-amd64\$}"
gkver=$(cat "$gkdir/version")

# stage_modules MODDIR STAGE NAME...: the named modules and what they depend on (read from each
# module's depends=), uncompressed into STAGE/lib/modules, in load order in STAGE/etc/modules.order.
stage_modules() {
  local moddir=$1 stage=$2; shift 2
  local mods m src
  mods=$(python3 "$repo/tools/module-order.py" "$moddir" "$@")
  mkdir -p "$stage/lib/modules" "$stage/etc"
  : > "$stage/etc/modules.order"
  for m in $mods; do
    src=$(find "$moddir" -name "$m.ko*" | head -1)
    [ -n "$src" ] || src=$(find "$moddir" -name "${m//_/-}.ko*" | head -1)
    [ -n "$src" ] || { log "module $m not found in $moddir"; exit 1; }
    case "$src" in
      *.ko.xz)  xz -dc "$src"  > "$stage/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$src" > "$stage/lib/modules/$m.ko" ;;
      *.ko.gz)  gzip -dc "$src" > "$stage/lib/modules/$m.ko" ;;
      *)        cp "$src" "$stage/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$stage/etc/modules.order"
  done
}
# stage_busybox STAGE APPLET...: the skeleton of a busybox initramfs.
stage_busybox() {
  local stage=$1 a; shift
  rm -rf "$stage"; mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,root,etc,lib/modules}
  cp /bin/busybox "$stage/bin/busybox"
  for a in "$@"; do ln -sf busybox "$stage/bin/$a"; done
}
pack_cpio() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2.tmp" && mv "$2.tmp" "$2"; }

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
  stage_busybox "$stage" sh mount umount insmod ip cat echo sleep ls poweroff mkdir dmesg uname seq
  stage_modules "$kdir/root/lib/modules/$kver" "$stage" virtio_net virtio_pci
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
  pack_cpio "$stage" "$initrd"
  echo "$stamp_src" > "$cache/initramfs.stamp"
fi

# ---- 4. the nested VFIO test's L1 initramfs -----------------------------------------------
# busybox, igb and vfio-pci with what they depend on, and tools/l1-init.sh as /init. The static
# vfmig binary is not in it: `vfmig vf nested-test` appends it as a second cpio archive at run
# time, so that the test always runs the vfmig it was built from.
l1_initrd=$cache/l1-initramfs.cpio.gz
l1_stamp=$({ cat "$repo/tools/l1-init.sh" "$0"; echo "$gkver"; } | sha256sum | cut -c1-16)
if [ ! -e "$l1_initrd" ] || [ "$(cat "$cache/l1-initramfs.stamp" 2>/dev/null)" != "$l1_stamp" ]; then
  log "building the L1 initramfs of the nested VFIO test (kernel $gkver)"
  stage=$cache/l1-initramfs.stage
  stage_busybox "$stage" sh mount umount insmod ip cat echo sleep ls poweroff mkdir dmesg uname \
    seq readlink basename grep head tail date
  stage_modules "$gkdir/root/lib/modules/$gkver" "$stage" \
    irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio_pci_core vfio_pci dca i2c_algo_bit igb
  cp "$repo/tools/l1-init.sh" "$stage/init"; chmod +x "$stage/init"
  pack_cpio "$stage" "$l1_initrd"
  echo "$l1_stamp" > "$cache/l1-initramfs.stamp"
fi
log "ready: kernel $kdir/vmlinuz ($kver), initramfs $initrd, L1 kernel $gkver, $(qemu-system-x86_64 --version | head -1)"
