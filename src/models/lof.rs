//! Local Outlier Factor in novelty mode, exactly as scikit-learn's
//! `LocalOutlierFactor(novelty=True)`: the training rows' k-distances and local reachability
//! densities are fixed at fit time, and a new row is scored against its k nearest training rows.
//!
//! Neighbours come from a `kiddo` `ImmutableKdTree` (the mutable tree panics on repeated values,
//! which one-hot columns always produce) or from a brute-force scan; both return the same
//! neighbours, and `benches/` measures which is faster on the real feature vector.

use std::num::NonZero;

use kiddo::SquaredEuclidean;
use kiddo::immutable::float::kdtree::ImmutableKdTree;
use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::config::LofIndexKind;

/// scikit-learn adds this to the mean reachability distance before inverting it.
const LRD_EPSILON: f64 = 1e-10;

/// A fitted LOF: training rows (row-major), their k-distances and densities.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LofModel {
    pub k: usize,
    pub dims: usize,
    pub points: Vec<f64>,
    pub k_distance: Vec<f64>,
    pub lrd: Vec<f64>,
    /// LOF of each training row (neighbours exclude the row itself), for the threshold.
    pub training_lof: Vec<f64>,
}

/// A k-nearest-neighbour search compiled for one width.
pub trait KdSearch: Send + Sync {
    fn nearest(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>);
}

struct Kd<const K: usize>(ImmutableKdTree<f64, u32, K, 32>);

impl<const K: usize> KdSearch for Kd<K> {
    fn nearest(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
        out.clear();
        let Ok(q) = <&[f64; K]>::try_from(q) else {
            return;
        };
        let Some(k) = NonZero::new(k) else { return };
        out.extend(
            self.0
                .nearest_n::<SquaredEuclidean>(q, k)
                .into_iter()
                .map(|n| (n.distance.sqrt(), n.item)),
        );
    }
}

fn build_kd<const K: usize>(points: &[f64]) -> Box<dyn KdSearch> {
    let rows: Vec<[f64; K]> = points
        .chunks_exact(K)
        .map(|c| <[f64; K]>::try_from(c).unwrap_or([0.0; K]))
        .collect();
    Box::new(Kd::<K>(ImmutableKdTree::new_from_slice(&rows)))
}

macro_rules! kd_for_width {
    ($width:expr, $points:expr, [$($n:literal)+]) => {
        match $width {
            $($n => Some(build_kd::<$n>($points)),)+
            _ => None,
        }
    };
}

/// Nearest-neighbour search over the training rows.
pub enum KnnIndex {
    KdTree(Box<dyn KdSearch>),
    Brute(BruteIndex),
}

impl std::fmt::Debug for KnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KdTree(_) => "KdTree",
            Self::Brute(_) => "Brute",
        })
    }
}

/// scikit-learn's `algorithm="auto"` rule (`NearestNeighbors._fit`): brute force above 15
/// dimensions or when k is at least half the rows, a KD-tree otherwise.
fn resolve(kind: LofIndexKind, dims: usize, rows: usize, k: usize) -> LofIndexKind {
    match kind {
        LofIndexKind::Auto if dims > 15 || k >= rows / 2 => LofIndexKind::Brute,
        LofIndexKind::Auto => LofIndexKind::Kdtree,
        chosen => chosen,
    }
}

impl KnnIndex {
    /// Builds the requested index for `k`-neighbour queries over row-major `points`; `auto`
    /// chooses as scikit-learn does, and widths above 32 fall back to the brute-force scan.
    pub fn build(kind: LofIndexKind, points: &[f64], dims: usize, k: usize) -> Self {
        let rows = points.len().checked_div(dims).unwrap_or(0);
        let brute = || Self::Brute(BruteIndex::new(points, dims));
        match resolve(kind, dims, rows, k) {
            LofIndexKind::Kdtree => kd_for_width!(dims, points, [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32])
                .map_or_else(brute, Self::KdTree),
            _ => brute(),
        }
    }

    /// The index actually built (never `auto`).
    pub fn kind(&self) -> LofIndexKind {
        match self {
            Self::KdTree(_) => LofIndexKind::Kdtree,
            Self::Brute(_) => LofIndexKind::Brute,
        }
    }

    /// The `k` nearest training rows to `q` as (distance, row), nearest first.
    pub fn nearest(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
        match self {
            Self::KdTree(tree) => tree.nearest(q, k, out),
            Self::Brute(brute) => brute.nearest(q, k, out),
        }
    }

    /// [`Self::nearest`] for each row of row-major `queries` of width `dims`, into `outs[i]`.
    pub fn nearest_many(
        &self,
        queries: &[f64],
        dims: usize,
        k: usize,
        outs: &mut Vec<Vec<(f64, u32)>>,
    ) {
        match self {
            Self::Brute(brute) => brute.nearest_many(queries, k, outs),
            Self::KdTree(tree) => {
                let rows = queries.chunks_exact(dims.max(1));
                outs.resize_with(rows.len(), Vec::new);
                for (q, out) in rows.zip(outs.iter_mut()) {
                    tree.nearest(q, k, out);
                }
            }
        }
    }
}

/// Rows scanned together: one block's distances are computed with vector instructions.
const LANES: usize = 8;
/// Queries scanned together by [`BruteIndex::nearest_many`].
const GROUP: usize = 8;

/// Exhaustive search, laid out for speed: the training rows in blocks of [`LANES`], each block
/// stored dimension by dimension, so a block's distances to a query are computed lane-parallel
/// (with the widest instructions the CPU has, chosen at run time). Each distance still sums its
/// squared differences in dimension order, so results are bit-identical to a row-by-row scan.
pub struct BruteIndex {
    dims: usize,
    rows: usize,
    blocks: Vec<f64>,
    /// The widest vector instructions this CPU has (AVX2 where present), found once.
    arch: pulp::Arch,
}

impl BruteIndex {
    pub fn new(points: &[f64], dims: usize) -> Self {
        let rows = points.len().checked_div(dims).unwrap_or(0);
        let mut blocks = vec![0.0; rows.div_ceil(2 * LANES) * 2 * dims * LANES];
        for (i, row) in points.chunks_exact(dims.max(1)).enumerate() {
            let (block, lane) = (i / LANES, i % LANES);
            for (d, &v) in row.iter().enumerate() {
                blocks[(block * dims + d) * LANES + lane] = v;
            }
        }
        Self {
            dims,
            rows,
            blocks,
            arch: pulp::Arch::new(),
        }
    }

    /// The `k` nearest rows to `q` as (distance, row), nearest first; ties go to the lower row.
    pub fn nearest(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
        self.arch.dispatch(Scan {
            index: self,
            queries: q,
            k,
            outs: std::slice::from_mut(out),
        });
    }

    /// [`Self::nearest`] for each row of row-major `queries`, into `outs[i]`. Queries are scanned
    /// in groups, so each block of training rows is read from memory once per group, not once
    /// per query: the training set (2,512 × 29 values, 580 KB) does not fit in a core's L2.
    pub fn nearest_many(&self, queries: &[f64], k: usize, outs: &mut Vec<Vec<(f64, u32)>>) {
        let n = queries.len().checked_div(self.dims).unwrap_or(0);
        outs.resize_with(n, Vec::new);
        for (group, outs) in queries
            .chunks(GROUP * self.dims.max(1))
            .zip(outs.chunks_mut(GROUP))
        {
            self.arch.dispatch(Scan {
                index: self,
                queries: group,
                k,
                outs,
            });
        }
    }

    /// Scans the training rows once for each of the row-major `queries` (at most [`GROUP`]).
    #[inline(always)]
    fn scan(&self, queries: &[f64], k: usize, outs: &mut [Vec<(f64, u32)>]) {
        for out in outs.iter_mut() {
            out.clear();
        }
        let k = k.min(self.rows);
        if k == 0 || self.dims == 0 || queries.len() != outs.len() * self.dims {
            return;
        }
        // `outs` collect candidates as squared distances; `worst` is infinite until k are in.
        let mut worst = [f64::INFINITY; GROUP];
        let stride = self.dims * LANES;
        for (pair, blocks) in self.blocks.chunks_exact(2 * stride).enumerate() {
            let (first, second) = blocks.split_at(stride);
            let first_row = pair * 2 * LANES;
            let mut each = queries
                .chunks_exact(self.dims)
                .zip(outs.iter_mut().zip(worst.iter_mut()));
            // Two queries at a time where there are two: eight independent chains of vector
            // additions, where one query alone has four.
            loop {
                match (each.next(), each.next()) {
                    (Some((q0, (out0, worst0))), Some((q1, (out1, worst1)))) => {
                        let [d0, d1] = block_pair_distances(first, second, [q0, q1]);
                        self.offer(&d0[0], first_row, k, worst0, out0);
                        self.offer(&d0[1], first_row + LANES, k, worst0, out0);
                        self.offer(&d1[0], first_row, k, worst1, out1);
                        self.offer(&d1[1], first_row + LANES, k, worst1, out1);
                    }
                    (Some((q, (out, worst))), None) => {
                        let [d] = block_pair_distances(first, second, [q]);
                        self.offer(&d[0], first_row, k, worst, out);
                        self.offer(&d[1], first_row + LANES, k, worst, out);
                        break;
                    }
                    _ => break,
                }
            }
        }
        for out in outs.iter_mut() {
            keep_nearest(out, k);
            for d in out.iter_mut() {
                d.0 = d.0.sqrt();
            }
        }
    }

    /// Adds one block's rows that are strictly nearer than `worst`, a distance that at least k
    /// rows already seen are within: a row at or beyond it cannot be among the k nearest, as
    /// every row seen earlier wins a tie. `worst` starts as the largest of the first k
    /// candidates and tightens to the k-th whenever the candidates fill up.
    #[inline(always)]
    fn offer(
        &self,
        block: &[f64; LANES],
        first_row: usize,
        k: usize,
        worst: &mut f64,
        candidates: &mut Vec<(f64, u32)>,
    ) {
        if !block.iter().fold(false, |any, &d2| any | (d2 < *worst)) {
            return;
        }
        for (lane, &d2) in block.iter().enumerate() {
            let row = first_row + lane;
            if row < self.rows && d2 < *worst {
                candidates.push((d2, row as u32));
            }
        }
        if candidates.len() >= 4 * k {
            *worst = shrink(candidates, k);
        } else if *worst == f64::INFINITY && candidates.len() >= k {
            *worst = candidates.iter().fold(0.0, |m, c| c.0.max(m));
        }
    }
}

/// Squared distances from each of `queries` to the rows of two consecutive blocks.
#[inline(always)]
fn block_pair_distances<const Q: usize>(
    first: &[f64],
    second: &[f64],
    queries: [&[f64]; Q],
) -> [[[f64; LANES]; 2]; Q] {
    let mut acc = [[[0.0f64; LANES]; 2]; Q];
    for (d, (a, b)) in first
        .chunks_exact(LANES)
        .zip(second.chunks_exact(LANES))
        .enumerate()
    {
        let (Ok(a), Ok(b)) = (<&[f64; LANES]>::try_from(a), <&[f64; LANES]>::try_from(b)) else {
            continue;
        };
        for (acc, q) in acc.iter_mut().zip(queries) {
            let qd = q[d];
            for (s, &x) in acc[0].iter_mut().zip(a) {
                let t = x - qd;
                *s += t * t;
            }
            for (s, &x) in acc[1].iter_mut().zip(b) {
                let t = x - qd;
                *s += t * t;
            }
        }
    }
    acc
}

/// A group's scan, compiled once per instruction set by `pulp` and run with the best one.
struct Scan<'a> {
    index: &'a BruteIndex,
    queries: &'a [f64],
    k: usize,
    outs: &'a mut [Vec<(f64, u32)>],
}

/// (distance, row) order: nearer first, ties to the lower row.
fn by_distance_then_row(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// Keeps the `k` nearest of `candidates` (unsorted) and returns the k-th distance.
fn shrink(candidates: &mut Vec<(f64, u32)>, k: usize) -> f64 {
    candidates.select_nth_unstable_by(k - 1, by_distance_then_row);
    candidates.truncate(k);
    candidates[k - 1].0
}

/// Keeps the `k` nearest of `candidates`, sorted.
fn keep_nearest(candidates: &mut Vec<(f64, u32)>, k: usize) {
    if candidates.len() > k {
        shrink(candidates, k);
    }
    candidates.sort_unstable_by(by_distance_then_row);
}

impl pulp::WithSimd for Scan<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        self.index.scan(self.queries, self.k, self.outs);
    }
}

impl LofModel {
    /// Fits on row-major `points` of width `dims` with `k` neighbours (capped at n - 1).
    pub fn fit(
        points: Vec<f64>,
        dims: usize,
        k: usize,
        index: &KnnIndex,
    ) -> Result<Self, ModelError> {
        if dims == 0 || points.len() % dims != 0 {
            return Err(ModelError::Inconsistent("LOF rows of unequal width".into()));
        }
        let n = points.len() / dims;
        if n < 2 {
            return Err(ModelError::Training(
                "LOF needs at least 2 training rows".into(),
            ));
        }
        let k = k.min(n - 1);
        let mut neighbours: Vec<Vec<(f64, u32)>> = Vec::with_capacity(n);
        let mut buf = Vec::new();
        for (i, row) in points.chunks_exact(dims).enumerate() {
            index.nearest(row, k + 1, &mut buf);
            // As scikit-learn: drop the row itself, or the nearest if duplicates hid it.
            let own = buf.iter().position(|&(_, j)| j as usize == i).unwrap_or(0);
            buf.remove(own);
            buf.truncate(k);
            neighbours.push(buf.clone());
        }
        let k_distance: Vec<f64> = neighbours
            .iter()
            .map(|nb| nb.last().map_or(0.0, |d| d.0))
            .collect();
        let lrd: Vec<f64> = neighbours
            .iter()
            .map(|nb| local_reachability_density(nb, &k_distance))
            .collect();
        let training_lof = neighbours
            .iter()
            .zip(&lrd)
            .map(|(nb, own)| mean_ratio(nb, &lrd, *own))
            .collect();
        Ok(Self {
            k,
            dims,
            points,
            k_distance,
            lrd,
            training_lof,
        })
    }

    /// LOF of a new row (about 1 for inliers, higher for outliers).
    pub fn score(&self, index: &KnnIndex, q: &[f64], buf: &mut Vec<(f64, u32)>) -> f64 {
        index.nearest(q, self.k, buf);
        self.score_neighbours(buf)
    }

    /// [`Self::score`] of each row of row-major `rows`, equal to scoring them one by one.
    pub fn score_many(
        &self,
        index: &KnnIndex,
        rows: &[f64],
        bufs: &mut Vec<Vec<(f64, u32)>>,
    ) -> Vec<f64> {
        index.nearest_many(rows, self.dims, self.k, bufs);
        bufs.iter().map(|nb| self.score_neighbours(nb)).collect()
    }

    fn score_neighbours(&self, neighbours: &[(f64, u32)]) -> f64 {
        let own = local_reachability_density(neighbours, &self.k_distance);
        mean_ratio(neighbours, &self.lrd, own)
    }
}

fn local_reachability_density(neighbours: &[(f64, u32)], k_distance: &[f64]) -> f64 {
    let reach: f64 = neighbours
        .iter()
        .map(|&(d, j)| d.max(k_distance[j as usize]))
        .sum();
    1.0 / (reach / neighbours.len() as f64 + LRD_EPSILON)
}

fn mean_ratio(neighbours: &[(f64, u32)], lrd: &[f64], own: f64) -> f64 {
    neighbours
        .iter()
        .map(|&(_, j)| lrd[j as usize] / own)
        .sum::<f64>()
        / neighbours.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_matrix(text: &str) -> (Vec<f64>, usize) {
        let mut lines = text.lines();
        let dims = lines.next().map_or(0, |h| h.split(',').count());
        let values = lines
            .flat_map(|l| {
                l.split(',')
                    .map(|v| v.trim().parse::<f64>().unwrap_or(f64::NAN))
            })
            .collect();
        (values, dims)
    }

    /// Fixture made by `sklearn_oracle.py --neighbors 20` (see tests/fixtures/README.md).
    #[test]
    fn scores_one_by_one_and_in_batches_equal_scikit_learn_novelty_lof_to_1e_9() {
        let (train, dims) = read_matrix(include_str!("../../tests/fixtures/lof_train.csv"));
        let (score, _) = read_matrix(include_str!("../../tests/fixtures/lof_score.csv"));
        let expected: Vec<f64> = include_str!("../../tests/fixtures/lof_expected.csv")
            .lines()
            .skip(1)
            .map(|l| {
                l.split(',')
                    .next()
                    .unwrap_or("")
                    .parse::<f64>()
                    .unwrap_or(f64::NAN)
            })
            .collect();
        for kind in [LofIndexKind::Kdtree, LofIndexKind::Brute] {
            let index = KnnIndex::build(kind, &train, dims, 20);
            assert_eq!(index.kind(), kind);
            let lof =
                LofModel::fit(train.clone(), dims, 20, &index).unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::new();
            let rows: Vec<&[f64]> = score.chunks_exact(dims).collect();
            assert_eq!(rows.len(), expected.len());
            let many = lof.score_many(&index, &score, &mut Vec::new());
            for (i, ((row, want), batch)) in rows.iter().zip(&expected).zip(many).enumerate() {
                let got = lof.score(&index, row, &mut buf);
                let rel = ((got - want) / want).abs();
                assert!(
                    rel <= 1e-9,
                    "{kind:?} row {i}: {got} vs scikit-learn {want}"
                );
                assert_eq!(
                    got.to_bits(),
                    batch.to_bits(),
                    "{kind:?} row {i} in a batch"
                );
            }
        }
    }

    #[test]
    fn auto_chooses_like_scikit_learn_a_kd_tree_up_to_15_columns_brute_force_above() {
        let build = |dims: usize, rows: usize, k: usize| {
            KnnIndex::build(LofIndexKind::Auto, &vec![0.5; dims * rows], dims, k).kind()
        };
        assert_eq!(build(15, 100, 20), LofIndexKind::Kdtree);
        assert_eq!(build(16, 100, 20), LofIndexKind::Brute);
        assert_eq!(build(8, 40, 20), LofIndexKind::Brute, "k >= rows / 2");
        assert_eq!(build(29, 100, 20), LofIndexKind::Brute);
    }

    #[test]
    fn kd_tree_and_brute_force_find_the_same_neighbours_with_repeated_values() {
        // One-hot style columns: many rows share values on every split axis.
        let points: Vec<f64> = (0..400)
            .flat_map(|i| [f64::from(i % 2), f64::from(i % 3 == 0), f64::from(i) * 0.01])
            .collect();
        let kd = KnnIndex::build(LofIndexKind::Kdtree, &points, 3, 10);
        let brute = KnnIndex::build(LofIndexKind::Brute, &points, 3, 10);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for q in [[0.0, 1.0, 0.5], [1.0, 0.0, 3.3], [0.5, 0.5, 9.0]] {
            kd.nearest(&q, 10, &mut a);
            brute.nearest(&q, 10, &mut b);
            let da: Vec<f64> = a.iter().map(|x| x.0).collect();
            let db: Vec<f64> = b.iter().map(|x| x.0).collect();
            assert_eq!(da, db);
        }
    }
}
