//! Checks that rely on nothing of vfmig's: QMP `pmemsave` dumps of guest RAM, compared page by
//! page by hash, and the generator's records read back from such a dump.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::companion::generator::{decode_record, SlotContent, Window};
use crate::qmp::{QmpClient, QmpError};

/// Errors of a RAM comparison.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `pmemsave` failed.
    #[error("QEMU could not dump guest RAM (pmemsave) on the {side}")]
    Pmemsave {
        /// `source` or `destination`.
        side: &'static str,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// A dump could not be read.
    #[error("cannot read RAM dump {}", path.display())]
    Read {
        /// The dump.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of comparing two RAM images page by page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RamComparison {
    /// Pages compared.
    pub pages: u64,
    /// Pages whose hashes differ.
    pub differing: u64,
    /// Up to ten differing page numbers.
    pub examples: Vec<u64>,
}

/// Dumps `[gpa, gpa + size)` of a VM into `path` with QMP `pmemsave`.
pub fn dump(
    qmp: &QmpClient,
    side: &'static str,
    gpa: u64,
    size: u64,
    path: &Path,
) -> Result<(), VerifyError> {
    qmp.pmemsave(gpa, size, path)
        .map_err(|source| VerifyError::Pmemsave { side, source })
}

fn page_hashes(path: &Path) -> Result<Vec<u64>, VerifyError> {
    let err = |source| VerifyError::Read {
        path: path.into(),
        source,
    };
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(err)?);
    let mut page = [0u8; 4096];
    let mut out = Vec::new();
    loop {
        let mut filled = 0;
        while filled < page.len() {
            let n = r.read(&mut page[filled..]).map_err(err)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(out);
        }
        out.push(xxh3_64(&page[..filled]));
        if filled < page.len() {
            return Ok(out);
        }
    }
}

/// Compares two dumps page by page, by hash.
pub fn compare_dumps(a: &Path, b: &Path) -> Result<RamComparison, VerifyError> {
    let (ha, hb) = (page_hashes(a)?, page_hashes(b)?);
    let mut c = RamComparison {
        pages: ha.len().max(hb.len()) as u64,
        ..Default::default()
    };
    for i in 0..ha.len().max(hb.len()) {
        if ha.get(i) != hb.get(i) {
            c.differing += 1;
            if c.examples.len() < 10 {
                c.examples.push(i as u64);
            }
        }
    }
    Ok(c)
}

/// Reads the generator's records from a dump that starts at `dump_gpa`.
pub fn records_in_dump(
    path: &Path,
    dump_gpa: u64,
    window: &Window,
) -> Result<Vec<SlotContent>, VerifyError> {
    let bytes = std::fs::read(path).map_err(|source| VerifyError::Read {
        path: path.into(),
        source,
    })?;
    Ok((0..window.slots)
        .map(|slot| {
            let at = (window.slot_gpa(slot) - dump_gpa) as usize;
            match bytes.get(at..at + window.record_size as usize) {
                Some(rec) => decode_record(rec, slot),
                None => SlotContent::Corrupt,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_exactly_the_differing_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut img = vec![0u8; 4096 * 8];
        std::fs::write(&a, &img).unwrap();
        img[4096 * 3 + 17] = 1;
        img[4096 * 7] = 9;
        std::fs::write(&b, &img).unwrap();
        let c = compare_dumps(&a, &b).unwrap();
        assert_eq!(c.pages, 8);
        assert_eq!(c.differing, 2);
        assert_eq!(c.examples, vec![3, 7]);
        assert_eq!(compare_dumps(&a, &a).unwrap().differing, 0);
    }
}
