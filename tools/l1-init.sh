#!/bin/sh
# /init of the nested VFIO test's L1 guest (busybox). Run by `vfmig vf nested-test`.
# It loads igb and vfio-pci (the order setup.sh computed from each module's depends=), creates
# two VFs on the emulated igb PF through sriov_numvfs, binds the first to vfio-pci, then runs
# vfmig's VFIO self-test on it, and checks that vfmig refuses the second, unbound VF. Each step
# prints one line `vfmig-l1: step NAME: ok|error: …`,
# which the host side reads from the serial console; the self-test prints its own steps and,
# last, its JSON result. Then the guest powers off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
step() { echo "vfmig-l1: step $1: $2"; }
finish() { echo "vfmig-l1: done rc=$1"; poweroff -f; sleep 5; }

for m in $(cat /etc/modules.order); do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "vfmig-l1: insmod $m failed"
done

# the igb PF: the first device the igb driver bound
pf=
for i in $(seq 1 100); do
  for d in /sys/bus/pci/drivers/igb/0000:*; do [ -e "$d" ] && pf=$(basename "$d") && break; done
  [ -n "$pf" ] && break
  sleep 0.1
done
if [ -z "$pf" ]; then
  step create_vfs "error: no PCI device is bound to igb (is -device igb present, and did insmod igb work?)"
  finish 1
fi
if ! echo 2 > /sys/bus/pci/devices/$pf/sriov_numvfs; then
  step create_vfs "error: writing 2 to /sys/bus/pci/devices/$pf/sriov_numvfs failed"
  finish 1
fi
vf=
for i in $(seq 1 100); do
  [ -e /sys/bus/pci/devices/$pf/virtfn0 ] && vf=$(basename "$(readlink /sys/bus/pci/devices/$pf/virtfn0)") && break
  sleep 0.1
done
if [ -z "$vf" ]; then
  step create_vfs "error: PF $pf has no virtfn0 after writing sriov_numvfs"
  finish 1
fi
step create_vfs "ok ($(cat /sys/bus/pci/devices/$pf/sriov_numvfs) VFs on PF $pf; VF0 is $vf)"

if [ ! -e /sys/bus/pci/devices/$vf/iommu_group ]; then
  step bind_vfio_pci "error: VF $vf has no IOMMU group (is intel_iommu=on on the command line?)"
  finish 1
fi
group=$(basename "$(readlink /sys/bus/pci/devices/$vf/iommu_group)")
[ -e /sys/bus/pci/devices/$vf/driver ] && echo "$vf" > /sys/bus/pci/devices/$vf/driver/unbind
echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
echo "$vf" > /sys/bus/pci/drivers_probe
for i in $(seq 1 100); do [ -e /dev/vfio/$group ] && break; sleep 0.1; done
drv=$(basename "$(readlink /sys/bus/pci/devices/$vf/driver 2>/dev/null)" 2>/dev/null)
if [ "$drv" != vfio-pci ] || [ ! -e /dev/vfio/$group ]; then
  step bind_vfio_pci "error: VF $vf is bound to '${drv:-no driver}', /dev/vfio/$group $( [ -e /dev/vfio/$group ] && echo exists || echo is missing)"
  finish 1
fi
step bind_vfio_pci "ok ($vf in IOMMU group $group, /dev/vfio/$group)"

# What vfmig says it can do with the VF (the runner reads the JSON).
echo "vfmig-l1: check-json $(/bin/vfmig vf check --json "$vf")"
# The PF's interface, up: the self-test sends the VF a frame from it, which the emulated NIC
# switches to the VF (VMDq loopback), and the VF DMAs it into the mapped memfd.
pfif=$(ls /sys/bus/pci/devices/$pf/net/ 2>/dev/null | head -1)
ip link set "$pfif" up 2>/dev/null
for i in $(seq 1 50); do [ "$(cat /sys/class/net/$pfif/carrier 2>/dev/null)" = 1 ] && break; sleep 0.1; done
/bin/vfmig vf self-test "$vf" --dma-from "$pfif"
rc=$?

# The DMA check's negative control: with the ring's IOVAs outside the IOMMU mapping, the
# device's writes fault and the frame must not be found.
out=$(/bin/vfmig vf self-test "$vf" --dma-from "$pfif" --dma-unmapped 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q "step device_dma: error: no frame arrived"; then
  step dma_negative_control "ok (ring outside the IOMMU mapping: the device's writes faulted, no frame found)"
else
  step dma_negative_control "error: with the ring outside the mapping the check did not fail as it must: $(echo "$out" | grep '^step device_dma' | head -1)"
  rc=1
fi

# The companion owns the VF: it opens it at start, reports it in `status`, releases it on quit
# (after which the VF can be opened again).
mkdir -p /run/vfmig
/bin/vfmig companion --name l1 --socket /run/vfmig/vhost.sock --control /run/vfmig/control.sock \
  --vfio "$vf" 2>/run/vfmig/companion.log &
cpid=$!
for i in $(seq 1 100); do [ -S /run/vfmig/control.sock ] && break; sleep 0.1; done
st=$(/bin/vfmig ctl --control /run/vfmig/control.sock status 2>&1)
if echo "$st" | grep -q "\"name\":\"$vf\"" && echo "$st" | grep -q '"released":false'; then
  /bin/vfmig ctl --control /run/vfmig/control.sock quit >/dev/null 2>&1
  for i in $(seq 1 50); do kill -0 $cpid 2>/dev/null || break; sleep 0.1; done
  if kill -0 $cpid 2>/dev/null; then
    step companion_owns_vf "error: the companion did not exit after quit"; rc=1
  elif /bin/vfmig vf check "$vf" >/dev/null 2>&1; then
    step companion_owns_vf "ok (companion --vfio $vf: in status, released on quit, the VF opens again)"
  else
    step companion_owns_vf "error: after the companion quit, $vf cannot be opened again"; rc=1
  fi
else
  step companion_owns_vf "error: the companion's status does not show $vf: $st $(tail -3 /run/vfmig/companion.log)"
  rc=1
  kill $cpid 2>/dev/null
fi

# The negative control: the second VF is bound to no driver; vfmig must refuse it at `open`
# and say how to bind it to vfio-pci.
vf1=$(basename "$(readlink /sys/bus/pci/devices/$pf/virtfn1)")
out=$(/bin/vfmig vf self-test "$vf1" 2>&1)
if [ $? -ne 0 ] && echo "$out" | grep -q "step open: error" && echo "$out" | grep -q driver_override; then
  step refuses_unbound_vf "ok (VF1 $vf1, bound to no driver, refused at open with the rebind commands)"
else
  step refuses_unbound_vf "error: vfmig did not refuse VF1 $vf1 (bound to no driver) at open with the rebind commands: $(echo "$out" | grep '^step open' | head -1)"
  rc=1
fi
finish $rc
