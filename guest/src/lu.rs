//! The numeric kernel of `lu-lite`: an SSOR-style relaxation on an N×N grid of `f64`, split
//! by rows, kept apart from the halo exchange so it can be tested without a device.
//!
//! One iteration updates every interior row `i` from the previous iteration's rows `i-1`,
//! `i` and `i+1`: a forward then a backward Gauss-Seidel sweep *along* the row (symmetric
//! successive over-relaxation within the row), Jacobi *across* rows. A row's new value thus
//! depends only on the previous iteration, never on which rank owns its neighbours, so the
//! result is bitwise the same for any number of ranks. The grid's border (rows 0 and N-1,
//! columns 0 and N-1) is fixed.

/// Over-relaxation factor.
pub const OMEGA: f64 = 1.2;

/// The initial value of grid point (i, j): deterministic, from the indices only.
pub fn initial(i: usize, j: usize) -> f64 {
    ((i * 31 + j * 17) % 97) as f64 / 97.0
}

/// The source term at (i, j).
pub fn source(i: usize, j: usize) -> f64 {
    ((i * 7 + j * 13) % 23) as f64 / 230.0
}

/// Row `i` of the initial grid.
pub fn initial_row(n: usize, i: usize) -> Vec<f64> {
    (0..n).map(|j| initial(i, j)).collect()
}

/// The rows `[lo, hi)` rank `rank` of `size` owns in an `n`-row grid.
pub fn rows_of(n: usize, rank: usize, size: usize) -> (usize, usize) {
    (rank * n / size, (rank + 1) * n / size)
}

/// FNV-1a 64 over bytes, continuing from `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// FNV-1a 64's initial value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 of a row's little-endian bytes.
pub fn row_hash(row: &[f64]) -> u64 {
    let mut h = FNV_OFFSET;
    for v in row {
        h = fnv1a(h, &v.to_le_bytes());
    }
    h
}

/// The global checksum: FNV-1a 64 over every row's [`row_hash`] (little-endian), in row
/// order. Independent of the decomposition; ranks can gather row hashes instead of rows.
pub fn global_checksum(row_hashes: &[u64]) -> u64 {
    let mut h = FNV_OFFSET;
    for r in row_hashes {
        h = fnv1a(h, &r.to_le_bytes());
    }
    h
}

/// The rows one rank owns.
#[derive(Debug, Clone)]
pub struct Block {
    /// Grid size.
    pub n: usize,
    /// First owned row.
    pub lo: usize,
    /// One past the last owned row.
    pub hi: usize,
    rows: Vec<f64>,
    next: Vec<f64>,
    src: Vec<f64>,
}

impl Block {
    /// The initial rows `[lo, hi)` of an `n`×`n` grid.
    pub fn new(n: usize, lo: usize, hi: usize) -> Block {
        assert!(n >= 3 && lo < hi && hi <= n, "bad block {lo}..{hi} of {n}");
        let rows: Vec<f64> = (lo..hi).flat_map(|i| initial_row(n, i)).collect();
        let src = (lo..hi)
            .flat_map(|i| (0..n).map(move |j| source(i, j)))
            .collect();
        Block {
            n,
            lo,
            hi,
            next: rows.clone(),
            rows,
            src,
        }
    }

    /// Global row `i` (must be owned).
    pub fn row(&self, i: usize) -> &[f64] {
        let k = i - self.lo;
        &self.rows[k * self.n..(k + 1) * self.n]
    }

    /// The first owned row (sent to the rank above).
    pub fn top(&self) -> &[f64] {
        self.row(self.lo)
    }

    /// The last owned row (sent to the rank below).
    pub fn bottom(&self) -> &[f64] {
        self.row(self.hi - 1)
    }

    /// Does a rank own rows above / below this block? (Then it needs their halo.)
    pub fn has_up(&self) -> bool {
        self.lo > 0
    }

    /// See [`has_up`](Self::has_up).
    pub fn has_down(&self) -> bool {
        self.hi < self.n
    }

    /// One iteration. `up` is row `lo-1` and `down` row `hi` as of the previous iteration
    /// (required when [`has_up`](Self::has_up) / [`has_down`](Self::has_down)).
    pub fn step(&mut self, up: Option<&[f64]>, down: Option<&[f64]>) {
        let n = self.n;
        self.next.copy_from_slice(&self.rows);
        for i in self.lo..self.hi {
            if i == 0 || i == n - 1 {
                continue; // fixed border rows
            }
            let k = i - self.lo;
            let above: &[f64] = if i == self.lo {
                up.expect("halo from the rank above")
            } else {
                &self.rows[(k - 1) * n..k * n]
            };
            let below: &[f64] = if i + 1 == self.hi {
                down.expect("halo from the rank below")
            } else {
                &self.rows[(k + 1) * n..(k + 2) * n]
            };
            let f = &self.src[k * n..(k + 1) * n];
            let cur = &mut self.next[k * n..(k + 1) * n];
            let relax = |cur: &mut [f64], j: usize| {
                let gs = 0.25 * (above[j] + below[j] + cur[j - 1] + cur[j + 1] + f[j]);
                cur[j] = (1.0 - OMEGA) * cur[j] + OMEGA * gs;
            };
            for j in 1..n - 1 {
                relax(cur, j);
            }
            for j in (1..n - 1).rev() {
                relax(cur, j);
            }
        }
        std::mem::swap(&mut self.rows, &mut self.next);
    }

    /// [`row_hash`] of each owned row, in order.
    pub fn row_hashes(&self) -> Vec<u64> {
        (self.lo..self.hi).map(|i| row_hash(self.row(i))).collect()
    }

    /// FNV-1a 64 over the owned rows' bytes (little-endian), in order.
    pub fn checksum(&self) -> u64 {
        let mut h = FNV_OFFSET;
        for v in &self.rows {
            h = fnv1a(h, &v.to_le_bytes());
        }
        h
    }
}

/// Runs `iters` iterations with `size` ranks in one process, exchanging halos through memory;
/// returns the global checksum and each rank's [`Block::checksum`].
pub fn simulate(n: usize, size: usize, iters: usize) -> (u64, Vec<u64>) {
    let mut blocks: Vec<Block> = (0..size)
        .map(|r| {
            let (lo, hi) = rows_of(n, r, size);
            Block::new(n, lo, hi)
        })
        .collect();
    for _ in 0..iters {
        // Halos as of the previous iteration: the neighbours' edge rows.
        let edges: Vec<(Vec<f64>, Vec<f64>)> = blocks
            .iter()
            .map(|b| (b.top().to_vec(), b.bottom().to_vec()))
            .collect();
        for (r, b) in blocks.iter_mut().enumerate() {
            let up = (r > 0).then(|| edges[r - 1].1.as_slice());
            let down = (r + 1 < size).then(|| edges[r + 1].0.as_slice());
            b.step(up, down);
        }
    }
    let hashes: Vec<u64> = blocks.iter().flat_map(|b| b.row_hashes()).collect();
    (
        global_checksum(&hashes),
        blocks.iter().map(|b| b.checksum()).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_is_deterministic_and_changes_the_grid() {
        let (a, ra) = simulate(64, 1, 20);
        let (b, rb) = simulate(64, 1, 20);
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        let (c, _) = simulate(64, 1, 0);
        assert_ne!(a, c);
        let (d, _) = simulate(64, 1, 21);
        assert_ne!(a, d);
    }

    #[test]
    fn checksum_is_independent_of_the_number_of_ranks() {
        let (one, _) = simulate(67, 1, 25);
        for size in [2, 3, 4, 7, 33] {
            let (g, per_rank) = simulate(67, size, 25);
            assert_eq!(g, one, "{size} ranks");
            assert_eq!(per_rank.len(), size);
        }
    }

    #[test]
    fn rows_are_split_exactly() {
        for (n, size) in [(256, 3), (10, 10), (7, 2)] {
            let mut next = 0;
            for r in 0..size {
                let (lo, hi) = rows_of(n, r, size);
                assert_eq!(lo, next);
                assert!(hi > lo);
                next = hi;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn values_stay_finite() {
        let mut b = Block::new(32, 0, 32);
        for _ in 0..500 {
            b.step(None, None);
        }
        assert!(b.row(16).iter().all(|v| v.is_finite()));
    }
}
