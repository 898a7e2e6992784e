//! Which guest RAM regions are mapped into the device's IOMMU domain, and how a new memory
//! table changes that.
//!
//! [`plan_remap`] is the pure diff between what is mapped and what the table wants;
//! [`Mappings`] applies it through a [`DmaMapper`] (the VFIO container, or a fake in tests)
//! and keeps the books: what is mapped, and the owners that keep the host memory alive.

use std::collections::BTreeMap;

use serde::Serialize;

use super::error::{DmaMapError, TableError, VfioVfError};
use crate::memory::LOG_PAGE_SIZE;
use crate::vf::{KeepAlive, MapChange, MappedRegion};

/// One mapping, as the IOMMU sees it: IOVA (= GPA), length, host address, access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RegionKey {
    /// Guest-physical address, which is also the IOVA.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host userspace address.
    pub host_addr: u64,
    /// Whether the device may write it.
    pub writable: bool,
}

impl RegionKey {
    /// The key of a region.
    pub fn of(r: &MappedRegion) -> Self {
        Self {
            gpa: r.gpa,
            size: r.size,
            host_addr: r.host_addr,
            writable: r.writable,
        }
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }

    fn span(&self) -> (u64, u64) {
        (self.gpa, self.size)
    }
}

/// What it takes to go from one table to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemapPlan {
    /// Mapped now and not wanted as they are: unmap first.
    pub unmap: Vec<RegionKey>,
    /// Wanted and not mapped as they are: map after the unmaps.
    pub map: Vec<RegionKey>,
    /// Mapped and wanted exactly so: leave alone.
    pub keep: Vec<RegionKey>,
}

/// Checks a table: every region non-empty, 4 KiB aligned in GPA, size and host address,
/// without wrap-around, and no two regions overlapping in GPA.
pub fn validate_table(regions: &[RegionKey]) -> Result<(), TableError> {
    let mut sorted: Vec<&RegionKey> = regions.iter().collect();
    sorted.sort_by_key(|r| r.gpa);
    for r in &sorted {
        let (gpa, size) = (r.gpa, r.size);
        if size == 0 {
            return Err(TableError::Empty { gpa });
        }
        if gpa % LOG_PAGE_SIZE != 0 || size % LOG_PAGE_SIZE != 0 {
            return Err(TableError::Unaligned { gpa, size });
        }
        if r.host_addr % LOG_PAGE_SIZE != 0 {
            return Err(TableError::HostUnaligned {
                gpa,
                host_addr: r.host_addr,
            });
        }
        if gpa.checked_add(size).is_none() || r.host_addr.checked_add(size).is_none() {
            return Err(TableError::Wraps { gpa, size });
        }
    }
    for pair in sorted.windows(2) {
        if pair[0].end() > pair[1].gpa {
            return Err(TableError::Overlap {
                a_start: pair[0].gpa,
                a_end: pair[0].end(),
                b_start: pair[1].gpa,
                b_end: pair[1].end(),
            });
        }
    }
    Ok(())
}

/// The diff from `current` to `wanted`: a region is kept only if it is wanted with the same
/// GPA, size, host address and access; anything else mapped is unmapped, anything else
/// wanted is mapped. Each list is in GPA order.
pub fn plan_remap(current: &[RegionKey], wanted: &[RegionKey]) -> RemapPlan {
    let mut plan = RemapPlan::default();
    for c in current {
        if wanted.contains(c) {
            plan.keep.push(*c);
        } else {
            plan.unmap.push(*c);
        }
    }
    for w in wanted {
        if !current.contains(w) && !plan.map.contains(w) {
            plan.map.push(*w);
        }
    }
    plan.unmap.sort();
    plan.map.sort();
    plan.keep.sort();
    plan
}

/// What maps and unmaps IOVA ranges: the VFIO container, or a fake.
pub trait DmaMapper {
    /// Maps `size` bytes at host address `host_addr` at `iova`.
    ///
    /// # Safety
    ///
    /// The host range must satisfy the contract of [`MappedRegion::new`] until it is unmapped.
    unsafe fn map(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        writable: bool,
    ) -> Result<(), DmaMapError>;
    /// Unmaps the range mapped at `iova`.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaMapError>;
}

/// The regions mapped into the device's IOMMU domain, keyed by GPA.
#[derive(Default)]
pub struct Mappings {
    mapped: BTreeMap<u64, (RegionKey, Option<KeepAlive>)>,
    last_change: MapChange,
}

impl Mappings {
    /// No mapping.
    pub fn new() -> Self {
        Self::default()
    }

    /// What is mapped, in GPA order.
    pub fn regions(&self) -> Vec<RegionKey> {
        self.mapped.values().map(|(k, _)| *k).collect()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.mapped.is_empty()
    }

    /// Bytes mapped.
    pub fn bytes(&self) -> u64 {
        self.mapped.values().map(|(k, _)| k.size).sum()
    }

    /// What the last [`Mappings::apply`] or [`Mappings::unmap_all`] changed.
    pub fn last_change(&self) -> &MapChange {
        &self.last_change
    }

    /// Makes the mappings equal to `wanted`: unmaps what went away or changed, then maps what
    /// is new. On error the books still say exactly what is mapped (the steps that succeeded
    /// stay done), and the error says which region failed.
    pub fn apply(
        &mut self,
        mapper: &dyn DmaMapper,
        wanted: &[MappedRegion],
    ) -> Result<MapChange, VfioVfError> {
        let keys: Vec<RegionKey> = wanted.iter().map(RegionKey::of).collect();
        validate_table(&keys).map_err(|reason| VfioVfError::BadTable { reason })?;
        if let Some(r) = wanted.iter().find(|r| !r.is_backed()) {
            return Err(VfioVfError::BadTable {
                reason: TableError::NotBacked { gpa: r.gpa },
            });
        }
        let plan = plan_remap(&self.regions(), &keys);
        let mut change = MapChange {
            kept: plan.keep.iter().map(RegionKey::span).collect(),
            ..Default::default()
        };
        let result = self.run_plan(mapper, &plan, wanted, &mut change);
        self.last_change = change.clone();
        result.map(|()| change)
    }

    fn run_plan(
        &mut self,
        mapper: &dyn DmaMapper,
        plan: &RemapPlan,
        wanted: &[MappedRegion],
        change: &mut MapChange,
    ) -> Result<(), VfioVfError> {
        for k in &plan.unmap {
            mapper
                .unmap(k.gpa, k.size)
                .map_err(|source| VfioVfError::Unmap {
                    gpa: k.gpa,
                    size: k.size,
                    source,
                })?;
            self.mapped.remove(&k.gpa);
            change.unmapped.push(k.span());
        }
        for k in &plan.map {
            let owner = wanted
                .iter()
                .find(|r| RegionKey::of(r) == *k)
                .and_then(|r| r.keep_alive().cloned());
            // SAFETY: `k` comes from a backed `MappedRegion` (checked in `apply`), whose
            // constructor's contract is the one `map` asks for; its owner is kept in the books
            // until the range is unmapped, so the host memory stays mapped that long.
            unsafe { mapper.map(k.gpa, k.size, k.host_addr, k.writable) }.map_err(|source| {
                VfioVfError::Map {
                    gpa: k.gpa,
                    size: k.size,
                    source,
                }
            })?;
            self.mapped.insert(k.gpa, (*k, owner));
            change.mapped.push(k.span());
        }
        Ok(())
    }

    /// Unmaps everything. Regions that fail to unmap stay in the books; the first error is
    /// returned after trying them all.
    pub fn unmap_all(&mut self, mapper: &dyn DmaMapper) -> Result<MapChange, VfioVfError> {
        let mut change = MapChange::default();
        let mut first_err = None;
        for k in self.regions() {
            match mapper.unmap(k.gpa, k.size) {
                Ok(()) => {
                    self.mapped.remove(&k.gpa);
                    change.unmapped.push(k.span());
                }
                Err(source) => {
                    first_err.get_or_insert(VfioVfError::Unmap {
                        gpa: k.gpa,
                        size: k.size,
                        source,
                    });
                }
            }
        }
        change.kept = self.regions().iter().map(RegionKey::span).collect();
        self.last_change = change.clone();
        match first_err {
            Some(e) => Err(e),
            None => Ok(change),
        }
    }

    /// Forgets every mapping without unmapping: for when the container is closed, which
    /// unmaps everything in the kernel.
    pub fn forget(&mut self) {
        self.mapped.clear();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;

    /// The error a kernel would give.
    fn refused(ioctl: &'static str, errno: i32) -> DmaMapError {
        DmaMapError::Ioctl {
            ioctl,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Records calls; fails maps and unmaps at the GPAs listed.
    #[derive(Default)]
    pub(crate) struct FakeMapper {
        pub calls: RefCell<Vec<String>>,
        pub fail_map_at: Option<u64>,
        pub fail_unmap_at: Option<u64>,
    }

    impl DmaMapper for FakeMapper {
        unsafe fn map(&self, iova: u64, size: u64, host: u64, w: bool) -> Result<(), DmaMapError> {
            if self.fail_map_at == Some(iova) {
                return Err(refused("VFIO_IOMMU_MAP_DMA", libc::EEXIST));
            }
            self.calls.borrow_mut().push(format!(
                "map {iova:#x}+{size:#x}@{host:#x}{}",
                if w { " rw" } else { " ro" }
            ));
            Ok(())
        }
        fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaMapError> {
            if self.fail_unmap_at == Some(iova) {
                return Err(refused("VFIO_IOMMU_UNMAP_DMA", libc::EINVAL));
            }
            self.calls
                .borrow_mut()
                .push(format!("unmap {iova:#x}+{size:#x}"));
            Ok(())
        }
    }

    fn key(gpa: u64, size: u64, host: u64) -> RegionKey {
        RegionKey {
            gpa,
            size,
            host_addr: host,
            writable: true,
        }
    }

    /// A backed region over nothing real: the fake mapper never touches memory.
    pub(crate) fn region(gpa: u64, size: u64, host: u64) -> MappedRegion {
        // SAFETY: only ever given to a fake mapper, which never maps or touches the memory.
        unsafe { MappedRegion::new(gpa, size, host, true, Arc::new(())) }
    }

    #[test]
    fn plan_keeps_identical_unmaps_changed_and_gone_maps_new() {
        let a = key(0, 0x10_0000, 0x7f00_0000_0000);
        let b = key(0x10_0000, 0x10_0000, 0x7f00_1000_0000);
        let c = key(0x100_0000, 0x1000, 0x7f00_2000_0000);
        let b_moved = RegionKey {
            host_addr: 0x7f00_3000_0000,
            ..b
        };
        let plan = plan_remap(&[a, b, c], &[a, b_moved]);
        assert_eq!(plan.keep, vec![a]);
        assert_eq!(plan.unmap, vec![b, c]);
        assert_eq!(plan.map, vec![b_moved]);
        let same = plan_remap(&[a, b], &[b, a]);
        assert_eq!(same.keep, vec![a, b]);
        assert!(same.map.is_empty() && same.unmap.is_empty());
        let ro = RegionKey {
            writable: false,
            ..a
        };
        let plan = plan_remap(&[a], &[ro]);
        assert_eq!(
            (plan.unmap, plan.map),
            (vec![a], vec![ro]),
            "access change remaps"
        );
        let all_gone = plan_remap(&[a, b], &[]);
        assert_eq!(all_gone.unmap, vec![a, b]);
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(validate_table(&[key(0, 0, 0)])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(validate_table(&[key(0x800, 0x1000, 0)])
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        assert!(validate_table(&[key(0, 0x1000, 0x10)])
            .unwrap_err()
            .to_string()
            .contains("host address"));
        assert!(
            validate_table(&[key(0, 0x2000, 0), key(0x1000, 0x1000, 0x10000)])
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
        assert!(validate_table(&[key(u64::MAX - 0xfff, 0x2000, 0)])
            .unwrap_err()
            .to_string()
            .contains("wraps"));
        assert!(validate_table(&[key(0x1000, 0x1000, 0), key(0, 0x1000, 0x1000)]).is_ok());
    }

    #[test]
    fn apply_unmaps_the_stale_region_before_mapping_its_replacement() {
        let m = FakeMapper::default();
        let mut books = Mappings::new();
        let r1 = region(0x1_0000_0000, 0x80_0000, 0x7f00_0000_0000);
        let r2 = region(0x1_0080_0000, 0x80_0000, 0x7f00_0080_0000);
        let c = books.apply(&m, &[r1.clone(), r2.clone()]).unwrap();
        assert_eq!(c.mapped.len(), 2);
        let r2_moved = region(0x2_0000_0000, 0x80_0000, 0x7f00_0080_0000);
        let c = books.apply(&m, &[r1.clone(), r2_moved.clone()]).unwrap();
        assert_eq!(c.unmapped, vec![(0x1_0080_0000, 0x80_0000)]);
        assert_eq!(c.mapped, vec![(0x2_0000_0000, 0x80_0000)]);
        assert_eq!(c.kept, vec![(0x1_0000_0000, 0x80_0000)]);
        assert_eq!(
            books.regions(),
            vec![RegionKey::of(&r1), RegionKey::of(&r2_moved)]
        );
        let calls = m.calls.borrow();
        assert_eq!(
            calls[2..],
            [
                "unmap 0x100800000+0x800000".to_string(),
                "map 0x200000000+0x800000@0x7f0000800000 rw".to_string()
            ]
        );
        drop(calls);
        let c = books.apply(&m, &[]).unwrap();
        assert_eq!(c.unmapped.len(), 2);
        assert!(books.is_empty());
    }

    #[test]
    fn a_failed_map_leaves_books_that_match_the_iommu() {
        let mut m = FakeMapper::default();
        let mut books = Mappings::new();
        let r1 = region(0, 0x1000, 0x10000);
        books.apply(&m, std::slice::from_ref(&r1)).unwrap();
        m.fail_map_at = Some(0x2000);
        let e = books
            .apply(
                &m,
                &[
                    r1.clone(),
                    region(0x1000, 0x1000, 0x20000),
                    region(0x2000, 0x1000, 0x30000),
                ],
            )
            .unwrap_err();
        assert!(e.to_string().contains("0x2000"), "{e}");
        assert_eq!(books.regions().len(), 2, "r1 and the one that mapped");
        assert_eq!(books.last_change().mapped, vec![(0x1000, 0x1000)]);
    }

    #[test]
    fn unmap_all_keeps_what_failed_to_unmap() {
        let mut m = FakeMapper::default();
        let mut books = Mappings::new();
        books
            .apply(
                &m,
                &[region(0, 0x1000, 0x10000), region(0x1000, 0x1000, 0x20000)],
            )
            .unwrap();
        m.fail_unmap_at = Some(0);
        assert!(books.unmap_all(&m).is_err());
        assert_eq!(books.regions().len(), 1);
        m.fail_unmap_at = None;
        books.unmap_all(&m).unwrap();
        assert!(books.is_empty());
    }

    #[test]
    fn descriptors_are_never_mapped() {
        let m = FakeMapper::default();
        let mut books = Mappings::new();
        let e = books
            .apply(&m, &[MappedRegion::descriptor(0, 0x1000, 0x10000, true)])
            .unwrap_err();
        assert!(e.to_string().contains("owns no memory"), "{e}");
        assert!(m.calls.borrow().is_empty());
    }
}
