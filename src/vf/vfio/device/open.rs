//! Opening a VF: sysfs checks first, then the type1 container and the device, what the
//! device offers (reset, FLR, DMA logging), and what to do when any of it fails.

use std::io;
use std::mem::size_of;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::state::{Open, VfioVf};
use super::tracking;
use crate::vf::vfio::config::{self, DEFAULT_PENDING_TIMEOUT};
use crate::vf::vfio::error::VfioVfError;
use crate::vf::vfio::mapping::Mappings;
use crate::vf::vfio::sysfs::{Bdf, SysfsInfo, DEFAULT_SYSFS_ROOT};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, u32::from(VFIO_TYPE), VFIO_BASE + 7);

/// The device's flags from `VFIO_DEVICE_GET_INFO` (vfio-ioctls keeps them private).
fn device_info_flags(device: &VfioDevice) -> io::Result<u32> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `device` is an open VFIO device fd; `info` is a valid, writable
    // `vfio_device_info` whose `argsz` tells the kernel its size, and it outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.flags)
}

/// What to do when the device would not open through its group.
fn open_device_hint(bdf: &str, e: &VfioError) -> String {
    match e {
        VfioError::OpenGroup(io, group) => match io.raw_os_error() {
            Some(libc::ENOENT) => format!(
                "/dev/vfio/{group} does not exist: is {bdf} bound to vfio-pci \
                 (`ls -l /sys/bus/pci/devices/{bdf}/driver`)?"
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => format!(
                "run as root, or give this user /dev/vfio/{group} \
                 (`chown USER /dev/vfio/{group}`)"
            ),
            Some(libc::EBUSY) => format!(
                "group {group} is already open in another process (a QEMU with \
                 -device vfio-pci, or another vfmig): stop it first (`fuser -v /dev/vfio/{group}`)"
            ),
            _ => format!("check /dev/vfio/{group}"),
        },
        VfioError::GroupViable => format!(
            "every device in the IOMMU group of {bdf} must be bound to vfio-pci or to no \
             driver: see /sys/bus/pci/devices/{bdf}/iommu_group/devices"
        ),
        VfioError::InvalidPath => {
            format!("cannot read /sys/bus/pci/devices/{bdf}/iommu_group: is the IOMMU on?")
        }
        VfioError::GroupSetContainer | VfioError::ContainerSetIOMMU(_) => {
            "the group could not join the type1 container: it may already be in another \
             container; load vfio_iommu_type1"
                .to_string()
        }
        VfioError::GroupGetDeviceFD(_) => {
            "the kernel refused the device fd: EBUSY means another process holds the device"
                .to_string()
        }
        _ => "check `dmesg` for vfio-pci messages about the device".to_string(),
    }
}

fn open_device_error(bdf: &Bdf, source: VfioError) -> VfioVfError {
    let bdf = bdf.to_string();
    let hint = open_device_hint(&bdf, &source);
    VfioVfError::OpenDevice { bdf, source, hint }
}

fn container_error(e: VfioError) -> VfioVfError {
    match e {
        VfioError::OpenContainer(source) => {
            let hint = match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    "load the VFIO modules: `modprobe vfio vfio_iommu_type1 vfio-pci`".to_string()
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    "run as root, or give this user access to /dev/vfio/vfio".to_string()
                }
                _ => "check that the vfio and vfio_iommu_type1 modules are loaded".to_string(),
            };
            VfioVfError::NoContainer { source, hint }
        }
        source => VfioVfError::Container {
            source,
            hint: "the kernel must offer the type1v2 IOMMU: `modprobe vfio_iommu_type1`"
                .to_string(),
        },
    }
}

impl VfioVf {
    /// Opens the VF at `bdf` (`0000:00:02.1`, or `00:02.1` for domain 0), checking sysfs at
    /// `/sys` first.
    pub fn open(bdf: &str) -> Result<Self, VfioVfError> {
        Self::open_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf)
    }

    /// As [`VfioVf::open`], with sysfs at `sysfs_root`.
    pub fn open_with_root(sysfs_root: &Path, bdf: &str) -> Result<Self, VfioVfError> {
        let bdf: Bdf = bdf.parse()?;
        let sysfs = SysfsInfo::read(sysfs_root, bdf)?;
        if let Some(problem) = sysfs.problems().into_iter().next() {
            return Err(problem);
        }
        Self::open_checked(sysfs)
    }

    /// Opens a device whose sysfs checks passed.
    pub(crate) fn open_checked(sysfs: SysfsInfo) -> Result<Self, VfioVfError> {
        let bdf = sysfs.bdf;
        let container = Arc::new(VfioContainer::new(None).map_err(container_error)?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device =
            VfioDevice::new(&sysfs.path, ops, false).map_err(|e| open_device_error(&bdf, e))?;
        let device_flags =
            device_info_flags(&device).map_err(|source| VfioVfError::DeviceInfo {
                bdf: bdf.to_string(),
                source,
            })?;
        let config_flags = device.get_region_flags(VFIO_PCI_CONFIG_REGION_INDEX);
        let want = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if config_flags & want != want {
            return Err(VfioVfError::ConfigRegion {
                bdf: bdf.to_string(),
                flags: config_flags,
            });
        }
        let open = Open {
            config_offset: device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX),
            config_size: device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX),
            device,
            container,
        };
        let (tracking, tracking_why) = tracking::probe(&open.device);
        let mut vf = Self {
            bdf,
            sysfs,
            open: Some(open),
            mappings: Mappings::new(),
            device_flags,
            flr: None,
            tracking,
            tracking_why,
            logging: None,
            carried: Vec::new(),
            warned_all_writable: false,
            quiesced: None,
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
        };
        let flr = config::flr_advertised(&vf.config()?)
            .map_err(|e| vf.config_error("reading the PCI Express capability", e))?;
        vf.flr = flr;
        tracing::info!(
            bdf = %vf.bdf,
            dirty_tracking = %vf.tracking,
            reset = vf.reset_supported(),
            flr = ?vf.flr,
            "VFIO VF opened"
        );
        Ok(vf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_say_what_to_do_and_keep_the_kernel_error_as_the_cause() {
        let bdf: Bdf = "0000:00:02.1".parse().unwrap();
        let e = open_device_error(
            &bdf,
            VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EBUSY), "7".into()),
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot open 0000:00:02.1 through VFIO; group 7"),
            "{msg}"
        );
        assert!(msg.contains("fuser -v /dev/vfio/7"), "{msg}");
        assert!(std::error::Error::source(&e).is_some());
        let e = container_error(VfioError::OpenContainer(io::Error::from_raw_os_error(
            libc::ENOENT,
        )));
        assert!(e.to_string().contains("modprobe vfio"), "{e}");
        assert!(matches!(e, VfioVfError::NoContainer { .. }));
        let e = container_error(VfioError::VfioType1V2);
        assert!(e.to_string().contains("type1v2"), "{e}");
    }
}
