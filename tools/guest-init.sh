#!/bin/sh
# vfmig guest init (busybox): mount the pseudo file systems, load the virtio-net
# modules in the order setup.sh computed from their depends=, then idle.
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
[ -x /bin/vfmig-guest-run ] && exec /bin/vfmig-guest-run
echo "vfmig-guest: ready"
while true; do sleep 3600; done
