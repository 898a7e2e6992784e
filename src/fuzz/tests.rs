//! The stable fuzz driver: for each target, every kept regression input, then
//! `VFMIG_FUZZ_RUNS` inputs (default [`DEFAULT_RUNS`]) from a fixed seed: seeds mutated a few
//! times over, spliced, and plain random bytes. A panic names the input (hex) and writes it to
//! `target/fuzz-crashes/<target>/`, ready to be kept under `fuzz/regressions/<target>/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use super::{seeds, TARGETS};

/// Inputs per target in a plain `cargo test`.
const DEFAULT_RUNS: usize = 300;

/// SplitMix64: small, fast, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that sit on boundaries, written little-endian over a random place.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX / 2,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(6) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                let i = rng.below(len);
                let n = w.min(len - i);
                input[i..i + n].copy_from_slice(&v[..n]);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                input.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, copy);
            }
            6 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ => input.truncate(rng.below(len + 1)),
        }
    }
}

fn runs() -> usize {
    std::env::var("VFMIG_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RUNS)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The inputs kept under `fuzz/<kind>/<target>/`, by name.
fn kept(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = repo().join("fuzz").join(kind).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

/// Runs `target` on `input`; on a panic, keeps the input and fails naming it.
fn run_one(name: &str, target: fn(&[u8]), input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_ok() {
        return;
    }
    let dir = repo().join("target").join("fuzz-crashes").join(name);
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("crash-{:016x}", xxhash_rust::xxh3::xxh3_64(input)));
    let _ = std::fs::write(&file, input);
    panic!(
        "fuzz target `{name}` panicked on {what} ({} bytes, kept as {}): {}",
        input.len(),
        file.display(),
        crate::companion::control::to_hex(&input[..input.len().min(512)])
    );
}

fn drive(name: &str) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a known target");
    for (path, input) in kept("regressions", name) {
        run_one(name, target, &input, &format!("{}", path.display()));
    }
    let mut corpus = seeds(name);
    corpus.extend(kept("corpus", name).into_iter().map(|(_, b)| b));
    assert!(!corpus.is_empty(), "target `{name}` has seeds");
    for seed in &corpus {
        run_one(name, target, seed, "a seed");
    }
    let mut rng = Rng(0x5eed ^ xxhash_rust::xxh3::xxh3_64(name.as_bytes()));
    for i in 0..runs() {
        let input = if rng.below(10) == 0 {
            (0..rng.below(256)).map(|_| rng.next() as u8).collect()
        } else {
            let mut input = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut input, &corpus);
            input
        };
        run_one(name, target, &input, &format!("generated input {i}"));
    }
}

#[test]
fn fuzz_guest() {
    drive("guest");
}

#[test]
fn fuzz_fabric() {
    drive("fabric");
}

#[test]
fn fuzz_qmp() {
    drive("qmp");
}

#[test]
fn fuzz_control() {
    drive("control");
}

#[test]
fn fuzz_vhost() {
    drive("vhost");
}

/// Writes [`seeds`] to `fuzz/corpus/<target>/seed-<n>` (run by `tools/fuzz.sh --seeds`).
#[test]
#[ignore = "writes the seed corpora: tools/fuzz.sh --seeds"]
fn write_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = repo().join("fuzz").join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
        }
    }
}

#[test]
fn the_mutator_is_deterministic_and_stays_small() {
    let seed = vec![1u8; 40];
    let mut a = Rng(7);
    let mut b = Rng(7);
    for _ in 0..200 {
        let (mut x, mut y) = (seed.clone(), seed.clone());
        mutate(&mut a, &mut x, std::slice::from_ref(&seed));
        mutate(&mut b, &mut y, std::slice::from_ref(&seed));
        assert_eq!(x, y);
        assert!(x.len() <= seed.len() + 6 * 64);
    }
}
