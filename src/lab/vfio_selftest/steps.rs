//! The self-test's run: each step in order, with what it checks; after a failed step the rest
//! are skipped.

use std::path::Path;
use std::sync::Arc;

use super::device_dma::device_dma;
use super::error::SelfTestError;
use super::plan::{DmaProbe, MOVED_GPA, TEST_RAM_GPA, TEST_RAM_SIZE};
use super::ram::MemfdRam;
use super::report::{SelfTestReport, Step, StepResult};
use crate::memory::LOG_PAGE_SIZE;
use crate::vf::vfio::error::chain;
use crate::vf::vfio::DEFAULT_SYSFS_ROOT;
use crate::vf::vfio::{Bdf, RegionKey, VfioVf};
use crate::vf::{DirtyTracking, MapChange, VfDevice};

/// Runs steps in order; after a failure, the rest are skipped.
struct Runner<'a> {
    steps: Vec<Step>,
    failed: Option<&'static str>,
    progress: &'a mut dyn FnMut(&Step),
}

impl Runner<'_> {
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<String, SelfTestError>) {
        let step = match self.failed {
            Some(at) => Step {
                name,
                result: StepResult::Skipped(format!("step {at} failed")),
                detail: String::new(),
            },
            None => match f() {
                Ok(detail) => Step {
                    name,
                    result: StepResult::Ok,
                    detail,
                },
                Err(e) => {
                    self.failed = Some(name);
                    Step {
                        name,
                        result: StepResult::Failed(chain(&e)),
                        detail: String::new(),
                    }
                }
            },
        };
        (self.progress)(&step);
        self.steps.push(step);
    }
}

/// What the steps share: the device once open, the guest RAM once made.
#[derive(Default)]
struct Bench {
    vf: Option<VfioVf>,
    ram: Option<Arc<MemfdRam>>,
    tracking: Option<DirtyTracking>,
}

impl Bench {
    /// The VF of a step, or the error of a step that finds none (only after `open` failed,
    /// when it is skipped anyway).
    fn vf(&mut self) -> Result<&mut VfioVf, SelfTestError> {
        self.vf.as_mut().ok_or(SelfTestError::NotOpen)
    }

    /// The VF and the guest RAM.
    fn vf_and_ram(&mut self) -> Result<(&mut VfioVf, Arc<MemfdRam>), SelfTestError> {
        let ram = self.ram.clone();
        let vf = self.vf()?;
        Ok((vf, ram.ok_or(SelfTestError::NoRam)?))
    }
}

fn spans(keys: &[RegionKey]) -> Vec<(u64, u64)> {
    keys.iter().map(|k| (k.gpa, k.size)).collect()
}

/// Runs the self-test on the VF at `bdf` with sysfs at `/sys`, calling `progress` as each
/// step finishes.
pub fn self_test(bdf: &str, progress: &mut dyn FnMut(&Step)) -> SelfTestReport {
    self_test_with_root(Path::new(DEFAULT_SYSFS_ROOT), bdf, progress)
}

/// As [`self_test`], with sysfs at `sysfs_root`.
pub fn self_test_with_root(
    sysfs_root: &Path,
    bdf: &str,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    run(sysfs_root, bdf, None, progress)
}

/// As [`self_test`], with the `device_dma` step when `dma` is given.
pub fn self_test_with_dma(
    bdf: &str,
    dma: Option<DmaProbe<'_>>,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    run(Path::new(DEFAULT_SYSFS_ROOT), bdf, dma, progress)
}

/// Runs every step on the VF at `bdf` with sysfs at `sysfs_root`, `device_dma` too when
/// `dma` is given, calling `progress` as each step finishes.
fn run(
    sysfs_root: &Path,
    bdf: &str,
    dma: Option<DmaProbe<'_>>,
    progress: &mut dyn FnMut(&Step),
) -> SelfTestReport {
    let mut run = Runner {
        steps: Vec::new(),
        failed: None,
        progress,
    };
    let mut bench = Bench::default();
    let mut shown_bdf = bdf
        .parse::<Bdf>()
        .map_or_else(|_| bdf.to_string(), |b| b.to_string());

    run.step("open", || {
        let v = VfioVf::open_with_root(sysfs_root, bdf)?;
        shown_bdf = v.bdf().to_string();
        let detail = v.describe();
        bench.tracking = Some(v.dirty_tracking());
        bench.vf = Some(v);
        Ok(detail)
    });
    run.step("map_memfd", || map_memfd(&mut bench));
    run.step("read_config", || read_config(bench.vf()?));
    run.step("bus_master", || bus_master(bench.vf()?));
    run.step("reset", || Ok(VfDevice::reset(bench.vf()?)?.detail));
    run.step("dirty_tracking", || dirty_tracking(&mut bench));
    if let Some(probe) = dma {
        run.step("device_dma", || {
            let (v, mem) = bench.vf_and_ram()?;
            device_dma(v, &mem, probe)
        });
    }
    run.step("unmap", || unmap(&mut bench));
    run.step("release", || release(bench.vf()?));

    SelfTestReport {
        bdf: shown_bdf,
        steps: run.steps,
        dirty_tracking: bench.tracking,
    }
}

/// `map_memfd`: 16 MiB of memfd mapped at IOVA = GPA, and the books say so.
fn map_memfd(bench: &mut Bench) -> Result<String, SelfTestError> {
    let v = bench.vf.as_mut().ok_or(SelfTestError::NotOpen)?;
    let mem = MemfdRam::new(TEST_RAM_SIZE)?;
    let region = mem.region(TEST_RAM_GPA, 0, TEST_RAM_SIZE);
    bench.ram = Some(mem);
    let change = v.map(&[region])?;
    let want = vec![(TEST_RAM_GPA, TEST_RAM_SIZE)];
    if change.mapped != want || spans(&v.mapped()) != want {
        return Err(SelfTestError::MappedBooks {
            books: v.mapped(),
            want,
        });
    }
    Ok(format!(
        "16 MiB memfd mapped at IOVA = GPA {TEST_RAM_GPA:#x}"
    ))
}

/// `read_config`: the IDs answer, and match sysfs.
fn read_config(v: &mut VfioVf) -> Result<String, SelfTestError> {
    let (vendor, device) = v.ids()?;
    for (what, id) in [("vendor", vendor), ("device", device)] {
        if id == 0 || id == 0xffff {
            return Err(SelfTestError::DeadId { what, id });
        }
    }
    let sys = v.sysfs();
    if sys.vendor != Some(vendor) || sys.device != Some(device) {
        return Err(SelfTestError::IdsDiffer {
            vendor,
            device,
            sysfs: format!(
                "{}:{}",
                sys.vendor.map_or("?".into(), |x| format!("{x:04x}")),
                sys.device.map_or("?".into(), |x| format!("{x:04x}"))
            ),
        });
    }
    let cmd = v.command()?;
    Ok(format!(
        "vendor {vendor:04x} device {device:04x}, as sysfs says; command {cmd:#06x}"
    ))
}

/// `bus_master`: set, clear and restore read back as written.
fn bus_master(v: &mut VfioVf) -> Result<String, SelfTestError> {
    let onoff = |b: bool| if b { "on" } else { "off" };
    let was = v.bus_master()?;
    for want in [true, false, was] {
        v.set_bus_master(want)?;
        let got = v.bus_master()?;
        if got != want {
            return Err(SelfTestError::BusMaster {
                wrote: onoff(want),
                read: onoff(got),
            });
        }
    }
    let onoff = onoff(was);
    Ok(format!(
        "was {onoff}; set -> on, clear -> off, restored {onoff}"
    ))
}

/// `dirty_tracking`: the sync reports inside the mapping, and all of it without DMA logging.
fn dirty_tracking(bench: &mut Bench) -> Result<String, SelfTestError> {
    let v = bench.vf.as_mut().ok_or(SelfTestError::NotOpen)?;
    let mode = v.dirty_tracking();
    bench.tracking = Some(mode);
    let mut ranges = Vec::new();
    let pages = v.sync_dirty(&mut |g, l| ranges.push((g, l)))?;
    let end = TEST_RAM_GPA + TEST_RAM_SIZE;
    if let Some(&(gpa, len)) = ranges
        .iter()
        .find(|&&(g, l)| g < TEST_RAM_GPA || g + l > end)
    {
        return Err(SelfTestError::OutsideMapping {
            gpa,
            len,
            start: TEST_RAM_GPA,
            end,
        });
    }
    let distinct = distinct_pages(&ranges);
    match mode {
        DirtyTracking::AllWritablePages => {
            let want = TEST_RAM_SIZE / LOG_PAGE_SIZE;
            if distinct != want || pages != want {
                return Err(SelfTestError::AllWritableCount {
                    want,
                    distinct,
                    pages,
                });
            }
            Ok(format!(
                "all-writable-pages: the device cannot log its DMA; sync reported all \
                 {want} pages of the mapping ({})",
                v.dirty_tracking_reason()
            ))
        }
        DirtyTracking::DeviceDmaLogging => Ok(format!(
            "device-dma-logging: sync reported {distinct} pages dirtied since the mapping"
        )),
        DirtyTracking::DmaEngine => Err(SelfTestError::SoftTracking),
    }
}

/// `unmap`: everything unmapped, then a remap on a changed table.
fn unmap(bench: &mut Bench) -> Result<String, SelfTestError> {
    let (v, mem) = bench.vf_and_ram()?;
    let change = v.map(&[])?;
    if !v.mapped().is_empty() || change.unmapped != vec![(TEST_RAM_GPA, TEST_RAM_SIZE)] {
        return Err(SelfTestError::UnmapBooks {
            books: v.mapped(),
            unmapped: change.unmapped,
        });
    }
    // Remap on a changed table: two halves, then the second moved elsewhere.
    let half = TEST_RAM_SIZE / 2;
    let a = mem.region(TEST_RAM_GPA, 0, half);
    let b = mem.region(TEST_RAM_GPA + half, half, half);
    let b_moved = mem.region(MOVED_GPA, half, half);
    v.map(&[a.clone(), b.clone()])?;
    let change = v.map(&[a.clone(), b_moved.clone()])?;
    check_remap(
        &change,
        &spans(&v.mapped()),
        (a.gpa, a.size),
        (b.gpa, b.size),
        (b_moved.gpa, b_moved.size),
    )?;
    v.map(&[])?;
    if !v.mapped().is_empty() {
        return Err(SelfTestError::StillMapped { books: v.mapped() });
    }
    Ok(format!(
        "unmapped all; remap on a changed table unmapped the stale {:#x}+{half:#x} and \
         mapped {MOVED_GPA:#x}+{half:#x}, keeping {TEST_RAM_GPA:#x}+{half:#x}",
        TEST_RAM_GPA + half
    ))
}

/// `release`: released, twice, and nothing left open or mapped.
fn release(v: &mut VfioVf) -> Result<String, SelfTestError> {
    VfDevice::release(v)?;
    VfDevice::release(v).map_err(SelfTestError::SecondRelease)?;
    if !v.is_released() || !v.mapped().is_empty() {
        return Err(SelfTestError::NotReleased);
    }
    Ok("logging stopped, bus master cleared, unmapped, closed; idempotent".to_string())
}

/// Checks a remap from `[a, b]` to `[a, b_moved]`: `b` unmapped, `b_moved` mapped, `a` kept,
/// and the books hold exactly `a` and `b_moved`.
fn check_remap(
    change: &MapChange,
    books: &[(u64, u64)],
    a: (u64, u64),
    b: (u64, u64),
    b_moved: (u64, u64),
) -> Result<(), SelfTestError> {
    if change.unmapped != vec![b] || change.mapped != vec![b_moved] || change.kept != vec![a] {
        return Err(SelfTestError::Remap {
            unmapped: change.unmapped.clone(),
            mapped: change.mapped.clone(),
            kept: change.kept.clone(),
            a,
            b,
            b_moved,
        });
    }
    let mut want = vec![a, b_moved];
    want.sort();
    if books != want.as_slice() {
        return Err(SelfTestError::RemapBooks {
            books: books.to_vec(),
            want,
        });
    }
    Ok(())
}

/// Number of distinct 4 KiB pages covered by `ranges`.
fn distinct_pages(ranges: &[(u64, u64)]) -> u64 {
    let mut pages: Vec<u64> = ranges
        .iter()
        .filter(|(_, l)| *l > 0)
        .flat_map(|&(g, l)| (g / LOG_PAGE_SIZE)..=((g + l - 1) / LOG_PAGE_SIZE))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages.len() as u64
}

#[cfg(test)]
mod tests {
    use super::super::plan::STEPS;
    use super::*;
    use crate::vf::vfio::sysfs::tests::FakeSysfs;

    #[test]
    fn a_failed_open_fails_the_test_and_skips_every_later_step() {
        let fake = FakeSysfs::new();
        fake.device("0000:00:02.1", 0x020000, Some("igbvf"), Some(9));
        let mut lines = Vec::new();
        let r = self_test_with_root(fake.root(), "00:02.1", &mut |s| lines.push(s.to_string()));
        assert!(!r.ok());
        assert_eq!(r.steps.len(), STEPS.len());
        assert_eq!(
            r.steps.iter().map(|s| s.name).collect::<Vec<_>>(),
            STEPS.to_vec()
        );
        assert!(matches!(&r.steps[0].result, StepResult::Failed(e) if e.contains("igbvf")));
        for s in &r.steps[1..] {
            assert_eq!(s.result, StepResult::Skipped("step open failed".into()));
        }
        assert_eq!(lines.len(), STEPS.len());
        assert!(lines[0].starts_with("step open: error: 0000:00:02.1 is bound to igbvf"));
        assert_eq!(lines[1], "step map_memfd: skipped: step open failed");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["bdf"], "0000:00:02.1", "normalised");
        assert_eq!(v["steps"]["release"], "skipped: step open failed");
        assert!(v["steps"]["open"]
            .as_str()
            .unwrap()
            .starts_with("error: 0000:00:02.1 is bound to igbvf"));
        assert!(v["dirty_tracking"].is_null());
        let keys: Vec<&String> = v["steps"].as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 8);
    }

    #[test]
    fn remap_check_and_page_count() {
        let a = (0x1000, 0x1000);
        let b = (0x2000, 0x1000);
        let m = (0x9000, 0x1000);
        let good = MapChange {
            mapped: vec![m],
            unmapped: vec![b],
            kept: vec![a],
        };
        assert!(check_remap(&good, &[a, m], a, b, m).is_ok());
        let stale_left = MapChange {
            mapped: vec![m],
            unmapped: vec![],
            kept: vec![a, b],
        };
        assert!(check_remap(&stale_left, &[a, b, m], a, b, m)
            .unwrap_err()
            .to_string()
            .contains("stale"));
        assert_eq!(
            distinct_pages(&[(0, 0x2000), (0x1000, 0x2000), (0x10_0000, 1)]),
            4
        );
    }
}
