#!/bin/sh
# vfmig MPI guest (lab only): run by tools/guest-init.sh as /bin/vfmig-guest-run once the NICs
# are bound. It gives the MPI NIC (the one whose MAC is vfmig.mpi_mac) the address of rank
# host INDEX of COUNT (vfmig.mpi=INDEX:COUNT): mpiINDEX, 10.78.0.(INDEX+1)/24, with every host
# in /etc/hosts; then starts dropbear, which Open MPI's launcher reaches through
# /usr/bin/vfmig-rsh with the key baked into the image. Root logs in with that key: this image
# is for the lab's throwaway VMs only, never for a machine anyone else can reach.
# With vfmig.hpcc=N:NB:P:Q it writes /root/hpccinf.txt. Each vfmig.mpi_job=NAME:A:B:C (the
# command, colon-separated; the option may be repeated) is then run in /root, in order, once
# every peer accepts the launcher's agent, between the console lines
# `vfmig-mpi: job NAME start` and `vfmig-mpi: job NAME exit STATUS after SECS s`; then each
# file vfmig.mpi_show=FILE of /root between `vfmig-mpi: file FILE begin` and `... end`; then
# `vfmig-mpi: done`. src/lab/mpi.rs writes these options and reads these lines.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
bb=/bin/busybox
index= count= mac= mtu= hpcc= jobs= show=
for t in $(cat /proc/cmdline); do
  case "$t" in
    vfmig.mpi=*) v=${t#vfmig.mpi=}; index=${v%%:*}; count=${v#*:} ;;
    vfmig.mpi_mac=*) mac=${t#vfmig.mpi_mac=} ;;
    vfmig.mpi_mtu=*) mtu=${t#vfmig.mpi_mtu=} ;;
    vfmig.hpcc=*) hpcc=${t#vfmig.hpcc=} ;;
    vfmig.mpi_job=*) jobs="$jobs ${t#vfmig.mpi_job=}" ;;
    vfmig.mpi_show=*) show="$show ${t#vfmig.mpi_show=}" ;;
  esac
done
idle() { echo "vfmig-mpi: $*"; while true; do $bb sleep 3600; done; }
[ -n "$index" ] && [ -n "$count" ] || idle "no vfmig.mpi=INDEX:COUNT; idle"

# Pinned buffers of the vfmig provider (one 2 MiB chunk per 32 slots of 64 KiB): huge pages,
# so that each is one guest-physical segment; and locked pages stay where they are.
echo 32 > /proc/sys/vm/nr_hugepages 2>/dev/null
echo 0 > /proc/sys/vm/compact_unevictable_allowed 2>/dev/null
mount -t tmpfs -o size=64m shm /dev/shm 2>/dev/null || { $bb mkdir -p /dev/shm && mount -t tmpfs -o size=64m shm /dev/shm; }
# The MPI NIC, found by its MAC (eth0 is the vhost-user NIC of the companion).
nic=
for i in $($bb seq 1 50); do
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && nic=${d##*/}
  done
  [ -n "$nic" ] && break
  $bb sleep 0.1
done
[ -n "$nic" ] || idle "no NIC with MAC $mac; idle"
me=mpi$index
$bb hostname "$me"
ip addr add "10.78.0.$((index + 1))/24" dev "$nic"
# Jumbo frames: under TCG every frame costs, and the segment carries whole 9000-byte frames
# (as UDP datagrams of QEMU's socket netdev, fragmented on a 1500-byte host link).
ip link set "$nic" mtu "${mtu:-9000}"
ip link set "$nic" up
{
  echo "127.0.0.1 localhost"
  for j in $($bb seq 0 $((count - 1))); do echo "10.78.0.$((j + 1)) mpi$j"; done
} > /etc/hosts
/usr/sbin/dropbear -s -r /etc/dropbear/dropbear_ed25519_host_key -p 22
echo "vfmig-mpi: up $me 10.78.0.$((index + 1)) on $nic, $($bb awk '/^MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) MiB available"

[ -n "$hpcc" ] && {
  IFS=: read -r n nb p q <<HPCC
$hpcc
HPCC
  $bb sed -e "6s/^[0-9]*/$n/" -e "8s/^[0-9]*/$nb/" -e "11s/^[0-9]*/$p/" -e "12s/^[0-9]*/$q/" \
    /etc/vfmig/hpccinf.txt > /root/hpccinf.txt
}
[ -n "$jobs" ] || idle "ready"

# Every peer runs a command through the launcher's own agent before the launcher starts orted
# there.
for j in $($bb seq 0 $((count - 1))); do
  for i in $($bb seq 1 120); do
    /usr/bin/vfmig-rsh "mpi$j" true </dev/null >/dev/null 2>&1 && break
    $bb sleep 0.5
  done
done
cd /root
set -f  # the jobs' words are taken as they are
for job in $jobs; do
  name=${job%%:*}
  old=$IFS; IFS=:; set -- ${job#*:}; IFS=$old
  echo "vfmig-mpi: job $name start"
  start=$($bb date +%s)
  "$@" 2>&1
  status=$?
  echo "vfmig-mpi: job $name exit $status after $(( $($bb date +%s) - start )) s"
done
for f in $show; do
  [ -f "/root/$f" ] || continue
  echo "vfmig-mpi: file $f begin"
  cat "/root/$f"
  echo "vfmig-mpi: file $f end"
done
idle "done"
