#!/bin/sh
# vfmig guest init (busybox): mount the pseudo file systems, load the virtio-net
# modules in the order setup.sh computed from their depends=, then idle.
# With `vfmig.run=NAME` on the kernel command line (and /bin/vfmig-agent present) it first
# reserves hugepages (vfmig.hugepages=N, default 32 x 2 MiB) for pinned buffers, brings eth0
# up and runs the agent, which runs /bin/NAME with vfmig.args (colon-separated) on the console.
# The companion's traffic generator writes into a GPA window that the kernel
# never touches (memmap= on the kernel command line); the guest does nothing there.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /etc/modules.order); do
  insmod /lib/modules/$m.ko || echo "vfmig-guest: insmod $m failed"
done
ip link set lo up
for i in $(seq 1 50); do
  [ -e /sys/class/net/eth0 ] && break
  sleep 0.1
done
if [ -e /sys/class/net/eth0 ]; then
  echo "vfmig-guest: nic-bound eth0"
else
  echo "vfmig-guest: no NIC"
fi
cmdline=$(cat /proc/cmdline)
case " $cmdline " in
  *" vfmig.run="*)
    if [ -x /bin/vfmig-agent ] && [ -e /sys/class/net/eth0 ]; then
      hugepages=32
      for t in $cmdline; do
        case "$t" in vfmig.hugepages=*) hugepages=${t#vfmig.hugepages=} ;; esac
      done
      echo "$hugepages" > /proc/sys/vm/nr_hugepages 2>/dev/null
      # Keep locked pages where they are: the companion writes them by guest-physical address.
      echo 0 > /proc/sys/vm/compact_unevictable_allowed 2>/dev/null
      ip link set eth0 up
      echo "vfmig-guest: agent start (hugepages $(cat /proc/sys/vm/nr_hugepages 2>/dev/null))"
      /bin/vfmig-agent
      echo "vfmig-guest: agent exit $?"
    else
      echo "vfmig-guest: vfmig.run given, but no /bin/vfmig-agent or no eth0"
    fi
    ;;
esac
[ -x /bin/vfmig-guest-run ] && exec /bin/vfmig-guest-run
echo "vfmig-guest: ready"
while true; do sleep 3600; done
