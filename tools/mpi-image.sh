#!/usr/bin/env bash
# The MPI guest image (lab only), called by tools/setup.sh: Debian 12's Open MPI, HPCC,
# NetPIPE and libfabric, dropbear for Open MPI's launcher, over the test guests' initramfs.
#   usage: tools/mpi-image.sh CACHE
# CACHE/initramfs.cpio.gz (busybox, the virtio-net modules, vfmig's init and static guest
# binaries) must exist. The packages and their dependency closure come from `apt-get download`
# and are unpacked with `dpkg -x` into an overlay, packed as a second cpio archive: the image is
# the base archive followed by the overlay (the kernel unpacks both, in order), so the base is
# built once. The overlay's /bin/vfmig-guest-run (tools/mpi-guest-run.sh) is what the base
# init runs last. Cached under CACHE with stamps; quiet when nothing changed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=$1
log() { printf 'setup: %s\n' "$*" >&2; }

# What the guest runs, and what it does not need of their dependencies: the packaging tools
# (no maintainer script runs), ssh (dropbear stands in), the MPI alternatives' metapackage and
# hwloc's plugins (X11, libxml2, ICU: 40 MB for topology sources a VM does not have).
packages=(openmpi-bin libopenmpi3 hpcc netpipe-openmpi libfabric1 dropbear-bin)
skip=(debconf dpkg adduser passwd openssh-client mpi-default-bin libhwloc-plugins)

base=$cache/initramfs.cpio.gz
image=$cache/mpi-initramfs.cpio.gz
overlay=$cache/mpi-overlay.cpio.gz
[ -e "$base" ] || { log "the base initramfs $base is missing"; exit 1; }

overlay_stamp=$(cat "$0" "$repo/tools/deb-closure.py" "$repo/tools/deb-alternatives.py" \
                    "$repo/tools/mpi-guest-run.sh" | sha256sum | cut -c1-16)
if [ ! -e "$overlay" ] || [ "$(cat "$cache/mpi-overlay.stamp" 2>/dev/null)" != "$overlay_stamp" ]; then
  [ -e "$cache/.apt-updated" ] || { DEBIAN_FRONTEND=noninteractive apt-get update -qq; touch "$cache/.apt-updated"; }
  skip_args=()
  for p in "${skip[@]}"; do skip_args+=(--skip "$p"); done
  closure=$(python3 "$repo/tools/deb-closure.py" "${skip_args[@]}" "${packages[@]}")
  log "building the MPI guest overlay: $(echo "$closure" | wc -l) packages"
  debs=$cache/mpi-debs
  rm -rf "$debs"; mkdir -p "$debs"
  # apt's sandbox user cannot write the cache; download as root without the warning.
  # shellcheck disable=SC2086 # one package a word
  (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root $closure)

  stage=$cache/mpi-overlay.stage
  rm -rf "$stage"; mkdir -p "$stage"
  for d in "$debs"/*.deb; do dpkg -x "$d" "$stage"; done
  mkdir -p "$stage"/{etc/vfmig,etc/dropbear,root/.ssh,bin,tmp}
  # HPCC's own example input; mpi-guest-run.sh sets its N, NB, P and Q.
  cp "$stage/usr/share/doc/hpcc/examples/_hpccinf.txt" "$stage/etc/vfmig/hpccinf.txt"
  # What a guest never reads: documentation, headers, translations, iconv's charset modules.
  rm -rf "$stage"/usr/share/{doc,man,info,lintian,locale,bug} "$stage"/usr/include \
    "$stage"/usr/lib/x86_64-linux-gnu/gconv
  python3 "$repo/tools/deb-alternatives.py" "$stage" "$debs"/*.deb >/dev/null
  # Debian 12's packages install under /lib as well as /usr/lib (no merged /usr): both stay.

  chmod 0700 "$stage/root" "$stage/root/.ssh"
  chmod 1777 "$stage/tmp"
  install -m 0755 "$repo/tools/mpi-guest-run.sh" "$stage/bin/vfmig-guest-run"

  # Root logs in with a key baked into the image: the lab's VMs only (see mpi-guest-run.sh).
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
  printf 'root:*:19000:0:99999:7:::\n' > "$stage/etc/shadow"; chmod 0600 "$stage/etc/shadow"
  printf 'root:x:0:\n' > "$stage/etc/group"
  printf '/bin/sh\n' > "$stage/etc/shells"
  # dropbearkey from the overlay itself, run by the overlay's own loader and libraries.
  run_staged() {
    "$stage/lib64/ld-linux-x86-64.so.2" \
      --library-path "$stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu" "$@"
  }
  run_staged "$stage/usr/bin/dropbearkey" -t ed25519 -f "$stage/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
  run_staged "$stage/usr/bin/dropbearkey" -t ed25519 -f "$stage/root/.ssh/id_dropbear" 2>/dev/null |
    grep '^ssh-ed25519 ' > "$stage/root/.ssh/authorized_keys"
  chmod 0600 "$stage/root/.ssh/authorized_keys" "$stage/root/.ssh/id_dropbear"
  # Open MPI's launcher agent (--mca plm_rsh_agent vfmig-rsh): dropbear's client with that key
  # and no host key check, for the lab's VMs only.
  cat > "$stage/usr/bin/vfmig-rsh" <<'RSH'
#!/bin/sh
# Open MPI's launcher agent in vfmig's lab MPI image: dropbear's client with the image's own
# key and no host key check. Lab VMs only.
exec /usr/bin/dbclient -y -y -i /root/.ssh/id_dropbear "$@"
RSH
  chmod 0755 "$stage/usr/bin/vfmig-rsh"

  (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) > "$overlay.tmp"
  mv "$overlay.tmp" "$overlay"
  echo "$overlay_stamp" > "$cache/mpi-overlay.stamp"
fi

# vfmig's own pieces, a third archive rebuilt when their sources change: the libfabric
# provider where libfabric looks by default (so `--mca mtl_ofi_provider_include vfmig` is all
# Open MPI needs), and mpi-ring, a deterministic MPI job built with Debian's mpicc.
vfmig_overlay=$cache/mpi-vfmig.cpio.gz
vfmig_stamp=$( (cd "$repo" && find provider guest proto -type f \
                  \( -name '*.rs' -o -name '*.toml' -o -name '*.c' -o -name '*.h' \) -print0 |
                  LC_ALL=C sort -z | xargs -0 cat; cat "$0") | sha256sum | cut -c1-16)
if [ ! -e "$vfmig_overlay" ] || [ "$(cat "$cache/mpi-vfmig.stamp" 2>/dev/null)" != "$vfmig_stamp" ]; then
  log "building vfmig's libfabric provider and mpi-ring for the MPI guest image"
  vstage=$cache/mpi-vfmig.stage
  rm -rf "$vstage"; mkdir -p "$vstage/usr/lib/x86_64-linux-gnu/libfabric" "$vstage/usr/bin"
  bash "$repo/tools/build-provider.sh" "$vstage/usr/lib/x86_64-linux-gnu/libfabric" 2>/dev/null
  mpicc -O2 -o "$vstage/usr/bin/mpi-ring" "$repo/provider/tests/mpi/ring_checksum.c"
  (cd "$vstage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) > "$vfmig_overlay.tmp"
  mv "$vfmig_overlay.tmp" "$vfmig_overlay"
  echo "$vfmig_stamp" > "$cache/mpi-vfmig.stamp"
fi

image_stamp="$overlay_stamp $vfmig_stamp $(sha256sum < "$base" | cut -c1-16)"
if [ ! -e "$image" ] || [ "$(cat "$cache/mpi-initramfs.stamp" 2>/dev/null)" != "$image_stamp" ]; then
  cat "$base" "$overlay" "$vfmig_overlay" > "$image.tmp"
  mv "$image.tmp" "$image"
  echo "$image_stamp" > "$cache/mpi-initramfs.stamp"
  log "MPI guest image $image: $(( $(stat -c %s "$image") / 1024 / 1024 )) MiB"
fi
