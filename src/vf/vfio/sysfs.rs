//! What sysfs says about a PCI function before anything touches `/dev/vfio`: that it exists,
//! that vfio-pci holds it, that it has an IOMMU group, and that the group is viable.
//!
//! The sysfs root is a parameter (`/sys` in real use) so that tests can build a fake tree.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use super::error::{BdfProblem, VfioVfError};

/// The sysfs root of a real system.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

/// The driver a VF must be bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// A PCI address: domain, bus, device, function (`0000:00:02.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..=31).
    pub device: u8,
    /// Function number (0..=7).
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = VfioVfError;

    /// Parses `DDDD:BB:DD.F`, or `BB:DD.F` (domain 0000), in hexadecimal.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |problem: BdfProblem| VfioVfError::BadBdf {
            input: input.to_string(),
            problem,
        };
        let s = input.trim();
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [bus, devfn] => ("0000", *bus, *devfn),
            [domain, bus, devfn] => (*domain, *bus, *devfn),
            _ => return Err(bad(BdfProblem::Shape)),
        };
        let Some((dev, func)) = devfn.split_once('.') else {
            return Err(bad(BdfProblem::NoDot));
        };
        let hex = |field: &'static str, text: &str, max_digits: usize, max: u32| {
            let not_hex = || {
                bad(BdfProblem::NotHex {
                    field,
                    text: text.to_string(),
                    max_digits,
                })
            };
            if text.is_empty()
                || text.len() > max_digits
                || !text.chars().all(|c| c.is_ascii_hexdigit())
            {
                return Err(not_hex());
            }
            let value = u32::from_str_radix(text, 16).map_err(|_| not_hex())?;
            if value > max {
                return Err(bad(BdfProblem::OutOfRange { field, value, max }));
            }
            Ok(value)
        };
        Ok(Bdf {
            domain: hex("domain", domain, 8, u32::MAX)?,
            bus: hex("bus", bus, 2, 0xff)? as u8,
            device: hex("device", dev, 2, 0x1f)? as u8,
            function: hex("function", func, 1, 7)? as u8,
        })
    }
}

/// One device of an IOMMU group, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Its address (the name of its entry in the group).
    pub bdf: String,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    /// Whether it is a PCI-to-PCI bridge (those do not stop a group being viable).
    pub bridge: bool,
    /// Whether it lets the group be used by VFIO.
    pub viable: bool,
}

/// What sysfs says about one PCI function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysfsInfo {
    /// Its address.
    pub bdf: Bdf,
    /// Its directory, `{root}/bus/pci/devices/{bdf}`.
    pub path: PathBuf,
    /// The sysfs root used.
    pub root: PathBuf,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    /// Vendor ID from sysfs `vendor`.
    pub vendor: Option<u16>,
    /// Device ID from sysfs `device`.
    pub device: Option<u16>,
    /// Class code from sysfs `class`.
    pub class: Option<u32>,
    /// Its IOMMU group, if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// Every device of that group.
    pub group_members: Vec<GroupMember>,
    /// Whether `{root}/bus/pci/drivers/vfio-pci` exists (the module is loaded).
    pub vfio_driver_loaded: bool,
}

/// Reads a sysfs hex attribute such as `0x8086`.
fn read_hex(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u32::from_str_radix(t, 16).ok()
}

/// The name of the directory a symlink points to, e.g. the driver of `.../driver`.
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether a class code is a PCI-to-PCI bridge (base class 06, subclass 04).
fn is_bridge(class: Option<u32>) -> bool {
    class.is_some_and(|c| c >> 8 == 0x0604)
}

impl SysfsInfo {
    /// Reads what sysfs under `root` says about `bdf`. Fails only when the device is absent.
    pub fn read(root: &Path, bdf: Bdf) -> Result<Self, VfioVfError> {
        let path = root.join("bus/pci/devices").join(bdf.to_string());
        if !path.exists() {
            return Err(VfioVfError::DeviceMissing {
                bdf: bdf.to_string(),
                path,
            });
        }
        let driver = link_name(&path.join("driver"));
        let iommu_group = link_name(&path.join("iommu_group")).and_then(|n| n.parse().ok());
        let mut group_members = Vec::new();
        if let Some(group) = iommu_group {
            let dir = root.join(format!("kernel/iommu_groups/{group}/devices"));
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let member = entry.path();
                    let driver = link_name(&member.join("driver"));
                    let bridge = is_bridge(read_hex(&member.join("class")));
                    let viable = bridge
                        || match driver.as_deref() {
                            None => true,
                            Some(d) => matches!(d, VFIO_DRIVER | "pci-stub" | "pcieport"),
                        };
                    group_members.push(GroupMember {
                        bdf: entry.file_name().to_string_lossy().into_owned(),
                        driver,
                        bridge,
                        viable,
                    });
                }
            }
            group_members.sort_by(|a, b| a.bdf.cmp(&b.bdf));
        }
        Ok(Self {
            bdf,
            vendor: read_hex(&path.join("vendor")).map(|v| v as u16),
            device: read_hex(&path.join("device")).map(|v| v as u16),
            class: read_hex(&path.join("class")),
            driver,
            iommu_group,
            group_members,
            vfio_driver_loaded: root.join("bus/pci/drivers").join(VFIO_DRIVER).is_dir(),
            root: root.to_path_buf(),
            path,
        })
    }

    /// The commands that bind the device to vfio-pci, one per line.
    pub fn rebind_commands(&self) -> String {
        let bdf = self.bdf;
        let devices = self.root.join("bus/pci/devices");
        let devices = devices.display();
        let mut lines = Vec::new();
        if !self.vfio_driver_loaded {
            lines.push("modprobe vfio-pci".to_string());
        }
        if self.driver.is_some() {
            lines.push(format!("echo {bdf} > {devices}/{bdf}/driver/unbind"));
        }
        lines.push(format!(
            "echo {VFIO_DRIVER} > {devices}/{bdf}/driver_override"
        ));
        lines.push(format!(
            "echo {bdf} > {}/bus/pci/drivers_probe",
            self.root.display()
        ));
        lines.join("\n")
    }

    /// Everything that stops the device being opened through VFIO, in the order to fix them.
    pub fn problems(&self) -> Vec<VfioVfError> {
        let mut problems = Vec::new();
        if self.driver.as_deref() != Some(VFIO_DRIVER) {
            problems.push(VfioVfError::NotBoundToVfio {
                bdf: self.bdf.to_string(),
                driver: self.driver.clone(),
                commands: self.rebind_commands(),
            });
        }
        match self.iommu_group {
            None => problems.push(VfioVfError::NoIommuGroup {
                bdf: self.bdf.to_string(),
            }),
            Some(group) => {
                // The device itself is reported above; name the others that block the group.
                let me = self.bdf.to_string();
                if let Some(bad) = self.group_members.iter().find(|m| !m.viable && m.bdf != me) {
                    problems.push(VfioVfError::GroupNotViable {
                        bdf: me,
                        group,
                        member: bad.bdf.clone(),
                        driver: bad.driver.clone().unwrap_or_default(),
                    });
                }
            }
        }
        problems
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs tree with one PCI function.
    pub(crate) struct FakeSysfs {
        pub dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(dir.path().join("bus/pci/drivers")).unwrap();
            std::fs::create_dir_all(dir.path().join("kernel/iommu_groups")).unwrap();
            Self { dir }
        }

        pub fn root(&self) -> &Path {
            self.dir.path()
        }

        /// Adds a device with IDs, a class, a driver and a group.
        pub fn device(
            &self,
            bdf: &str,
            class: u32,
            driver: Option<&str>,
            group: Option<u32>,
        ) -> &Self {
            let root = self.root();
            let dev = root.join("bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("vendor"), "0x8086\n").unwrap();
            std::fs::write(dev.join("device"), "0x10ca\n").unwrap();
            std::fs::write(dev.join("class"), format!("{class:#08x}\n")).unwrap();
            if let Some(d) = driver {
                let ddir = root.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).unwrap();
                symlink(&ddir, dev.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = root.join(format!("kernel/iommu_groups/{g}/devices"));
                std::fs::create_dir_all(&gdir).unwrap();
                symlink(gdir.parent().unwrap(), dev.join("iommu_group")).unwrap();
                symlink(&dev, gdir.join(bdf)).unwrap();
            }
            self
        }
    }

    #[test]
    fn bdf_parses_full_and_short_forms() {
        let b: Bdf = "0000:00:02.1".parse().unwrap();
        assert_eq!(
            b,
            Bdf {
                domain: 0,
                bus: 0,
                device: 2,
                function: 1
            }
        );
        assert_eq!("00:02.1".parse::<Bdf>().unwrap(), b);
        assert_eq!(b.to_string(), "0000:00:02.1");
        let c: Bdf = " 0001:af:1f.7\n".parse().unwrap();
        assert_eq!(c.to_string(), "0001:af:1f.7");
        assert_eq!("AF:00.0".parse::<Bdf>().unwrap().bus, 0xaf);
    }

    #[test]
    fn bad_bdfs_are_refused_with_the_reason() {
        for (input, why) in [
            ("", "expected"),
            ("00:02", "dot"),
            ("0000:00:20.0", "device 0x20 is out of range"),
            ("0000:00:02.8", "function 0x8 is out of range"),
            ("0000:100:02.0", "bus `100`"),
            ("zz:00.0", "bus `zz`"),
            ("0:0:0:0.0", "expected"),
            ("00:02.-1", "function"),
        ] {
            let e = input.parse::<Bdf>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{input}: {msg}");
        }
    }

    #[test]
    fn a_missing_device_says_what_to_check() {
        let fake = FakeSysfs::new();
        let e = SysfsInfo::read(fake.root(), "0000:00:1f.7".parse().unwrap()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("0000:00:1f.7"), "{msg}");
        assert!(msg.contains("lspci"), "{msg}");
        assert!(msg.contains("sriov_numvfs"), "{msg}");
    }

    #[test]
    fn a_device_bound_to_igbvf_names_it_and_gives_the_rebind_commands() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("igbvf"), Some(7));
        std::fs::create_dir_all(fake.root().join("bus/pci/drivers/vfio-pci")).unwrap();
        let info = SysfsInfo::read(fake.root(), "00:02.1".parse().unwrap()).unwrap();
        assert_eq!(info.driver.as_deref(), Some("igbvf"));
        let problems = info.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let msg = problems[0].to_string();
        let root = fake.root().display();
        assert!(msg.contains("igbvf"), "{msg}");
        assert!(
            msg.contains(&format!(
                "echo 0000:00:02.1 > {root}/bus/pci/devices/0000:00:02.1/driver/unbind"
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "echo vfio-pci > {root}/bus/pci/devices/0000:00:02.1/driver_override"
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("echo 0000:00:02.1 > {root}/bus/pci/drivers_probe")),
            "{msg}"
        );
        assert!(!msg.contains("modprobe"), "vfio-pci is loaded: {msg}");
    }

    #[test]
    fn a_device_without_driver_and_without_vfio_pci_loaded_says_modprobe() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, None, Some(7));
        let info = SysfsInfo::read(fake.root(), "00:02.1".parse().unwrap()).unwrap();
        let problems = info.problems();
        assert_eq!(problems.len(), 1);
        let msg = problems[0].to_string();
        assert!(msg.contains("no driver"), "{msg}");
        assert!(msg.contains("modprobe vfio-pci"), "{msg}");
        assert!(!msg.contains("driver/unbind"), "nothing to unbind: {msg}");
        assert!(msg.contains("driver_override"), "{msg}");
    }

    #[test]
    fn no_iommu_group_means_the_iommu_is_off() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("vfio-pci"), None);
        let info = SysfsInfo::read(fake.root(), "00:02.1".parse().unwrap()).unwrap();
        let problems = info.problems();
        assert_eq!(problems.len(), 1);
        let msg = problems[0].to_string();
        assert!(msg.contains("intel_iommu=on"), "{msg}");
        assert!(msg.contains("amd_iommu=on"), "{msg}");
    }

    #[test]
    fn a_group_with_a_device_on_another_driver_is_not_viable() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("vfio-pci"), Some(3))
            .device("0000:00:02.2", 0x020000, Some("igbvf"), Some(3))
            .device("0000:00:01.0", 0x060400, Some("pcieport"), Some(3));
        let info = SysfsInfo::read(fake.root(), "00:02.1".parse().unwrap()).unwrap();
        assert_eq!(info.group_members.len(), 3);
        let problems = info.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let msg = problems[0].to_string();
        assert!(msg.contains("0000:00:02.2"), "{msg}");
        assert!(msg.contains("igbvf"), "{msg}");
        assert!(msg.contains("group 3"), "{msg}");
    }

    #[test]
    fn a_good_tree_passes() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("vfio-pci"), Some(3))
            .device("0000:00:02.2", 0x020000, None, Some(3))
            .device(
                "0000:00:01.0",
                0x060400,
                Some("weird-bridge-driver"),
                Some(3),
            );
        let info = SysfsInfo::read(fake.root(), "0000:00:02.1".parse().unwrap()).unwrap();
        assert!(info.problems().is_empty(), "{:?}", info.problems());
        assert_eq!(info.iommu_group, Some(3));
        assert_eq!(info.vendor, Some(0x8086));
        assert_eq!(info.device, Some(0x10ca));
        assert!(info.group_members.iter().all(|m| m.viable));
        assert!(info.group_members.iter().any(|m| m.bridge));
    }
}
