//! `vfmig vf check`: everything about a VF that matters to vfmig, and every problem with it,
//! reported even when the device cannot be opened.

use std::fmt;
use std::path::Path;

use serde::Serialize;

pub use super::device::DeviceRegion;
use super::device::VfioVf;
use super::error::chain;
use super::sysfs::{Bdf, GroupMember, SysfsInfo, DEFAULT_SYSFS_ROOT};
use crate::vf::{DirtyTracking, VfDevice};

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The address as given, normalised when it parses.
    pub bdf: String,
    /// Whether the device exists in sysfs.
    pub exists: bool,
    /// The driver bound to it.
    pub driver: Option<String>,
    /// Vendor ID from sysfs.
    pub sysfs_vendor: Option<String>,
    /// Device ID from sysfs.
    pub sysfs_device: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<u32>,
    /// The devices of that group.
    pub group_members: Vec<GroupMember>,
    /// Whether it was opened through VFIO.
    pub opened: bool,
    /// Vendor ID read from config space through VFIO.
    pub vendor_id: Option<String>,
    /// Device ID read from config space through VFIO.
    pub device_id: Option<String>,
    /// The VFIO regions.
    pub regions: Vec<DeviceRegion>,
    /// Whether VFIO_DEVICE_RESET is offered.
    pub reset_supported: Option<bool>,
    /// Whether the device advertises FLR.
    pub flr_advertised: Option<bool>,
    /// How its writes would be tracked.
    pub dirty_tracking: Option<DirtyTracking>,
    /// Why that mode.
    pub dirty_tracking_reason: Option<String>,
    /// Everything that stops vfmig using it, each with what to do.
    pub problems: Vec<String>,
    /// No problem.
    pub ok: bool,
}

/// Checks the device at `bdf` with sysfs at `/sys`.
pub fn check(bdf: &str) -> CheckReport {
    check_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf)
}

/// Checks the device at `bdf` with sysfs at `sysfs_root`: sysfs first; only if sysfs shows no
/// problem, opens it through VFIO for IDs, regions, reset and dirty tracking, then releases it.
pub fn check_with_root(sysfs_root: &Path, bdf: &str) -> CheckReport {
    let mut report = CheckReport {
        bdf: bdf.to_string(),
        ..Default::default()
    };
    let parsed: Bdf = match bdf.parse() {
        Ok(b) => b,
        Err(e) => {
            report.problems.push(chain(&e));
            return report;
        }
    };
    report.bdf = parsed.to_string();
    let info = match SysfsInfo::read(sysfs_root, parsed) {
        Ok(i) => i,
        Err(e) => {
            report.problems.push(chain(&e));
            return report;
        }
    };
    report.exists = true;
    report.driver = info.driver.clone();
    report.sysfs_vendor = info.vendor.map(|v| format!("{v:#06x}"));
    report.sysfs_device = info.device.map(|v| format!("{v:#06x}"));
    report.iommu_group = info.iommu_group;
    report.group_members = info.group_members.clone();
    let problems = info.problems();
    if !problems.is_empty() {
        report.problems.extend(problems.iter().map(|p| chain(p)));
        return report;
    }
    let mut vf = match VfioVf::open_checked(info) {
        Ok(vf) => vf,
        Err(e) => {
            report.problems.push(chain(&e));
            return report;
        }
    };
    report.opened = true;
    match vf.ids() {
        Ok((v, d)) => {
            report.vendor_id = Some(format!("{v:#06x}"));
            report.device_id = Some(format!("{d:#06x}"));
        }
        Err(e) => report.problems.push(chain(&e)),
    }
    report.regions = vf.regions();
    report.reset_supported = Some(vf.reset_supported());
    report.flr_advertised = vf.flr_advertised();
    report.dirty_tracking = Some(vf.dirty_tracking());
    report.dirty_tracking_reason = Some(vf.dirty_tracking_reason().to_string());
    if let Err(e) = vf.release() {
        report.problems.push(chain(&e));
    }
    report.ok = report.problems.is_empty();
    report
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VF {}", self.bdf)?;
        if !self.exists {
            writeln!(f, "  device:          not found")?;
        } else {
            writeln!(
                f,
                "  driver:          {}",
                self.driver.as_deref().unwrap_or("(none)")
            )?;
            writeln!(
                f,
                "  sysfs IDs:       vendor {} device {}",
                opt(&self.sysfs_vendor),
                opt(&self.sysfs_device)
            )?;
            match self.iommu_group {
                None => writeln!(f, "  IOMMU group:     none")?,
                Some(g) => {
                    writeln!(f, "  IOMMU group:     {g}")?;
                    for m in &self.group_members {
                        writeln!(
                            f,
                            "    {} {}{}{}",
                            m.bdf,
                            m.driver.as_deref().unwrap_or("(no driver)"),
                            if m.bridge { ", bridge" } else { "" },
                            if m.viable {
                                ""
                            } else {
                                "  <- blocks the group"
                            }
                        )?;
                    }
                }
            }
        }
        if self.opened {
            writeln!(
                f,
                "  config IDs:      vendor {} device {}",
                opt(&self.vendor_id),
                opt(&self.device_id)
            )?;
            writeln!(f, "  regions:")?;
            for r in &self.regions {
                writeln!(
                    f,
                    "    {:>2} {:<6} {:>12} bytes  {}{}{}",
                    r.index,
                    r.name,
                    r.size,
                    if r.readable { "r" } else { "-" },
                    if r.writable { "w" } else { "-" },
                    if r.mmap { "m" } else { "-" }
                )?;
            }
            writeln!(
                f,
                "  reset:           {}",
                match self.reset_supported {
                    Some(true) => "VFIO_DEVICE_RESET supported",
                    Some(false) => "not supported",
                    None => "-",
                }
            )?;
            writeln!(
                f,
                "  FLR advertised:  {}",
                match self.flr_advertised {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "no PCI Express capability",
                }
            )?;
            writeln!(
                f,
                "  dirty tracking:  {} ({})",
                opt(&self.dirty_tracking),
                self.dirty_tracking_reason.as_deref().unwrap_or("-")
            )?;
        } else {
            writeln!(f, "  VFIO:            not opened")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "OK: vfmig can use {}", self.bdf)?;
        } else {
            writeln!(f, "PROBLEMS:")?;
            for p in &self.problems {
                let mut lines = p.lines();
                if let Some(first) = lines.next() {
                    writeln!(f, "  - {first}")?;
                }
                for l in lines {
                    writeln!(f, "      {l}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf::vfio::sysfs::tests::FakeSysfs;

    #[test]
    fn a_missing_device_is_a_report_with_the_problem_not_an_error() {
        let fake = FakeSysfs::new();
        let r = check_with_root(fake.root(), "0000:00:1f.7");
        assert!(!r.ok && !r.exists && !r.opened);
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].contains("no PCI device 0000:00:1f.7"));
        let text = r.to_string();
        assert!(
            text.contains("not found") && text.contains("PROBLEMS"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["bdf"], "0000:00:1f.7");
    }

    #[test]
    fn sysfs_problems_are_reported_with_the_sysfs_facts() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("igbvf"), Some(4))
            .device("0000:00:02.2", 0x020000, Some("e1000e"), Some(4));
        let r = check_with_root(fake.root(), "00:02.1");
        assert_eq!(r.bdf, "0000:00:02.1");
        assert!(r.exists && !r.opened && !r.ok);
        assert_eq!(r.driver.as_deref(), Some("igbvf"));
        assert_eq!(r.sysfs_vendor.as_deref(), Some("0x8086"));
        assert_eq!(r.iommu_group, Some(4));
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(r.problems[0].contains("driver_override"));
        assert!(r.problems[1].contains("e1000e"));
        let text = r.to_string();
        assert!(text.contains("<- blocks the group"), "{text}");
        assert!(text.contains("      echo"), "commands indented: {text}");
    }

    #[test]
    fn a_bad_address_is_a_problem() {
        let r = check_with_root(Path::new("/nonexistent"), "nonsense");
        assert!(!r.ok);
        assert!(r.problems[0].contains("not a PCI address"));
    }
}
