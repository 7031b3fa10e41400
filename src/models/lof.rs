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
    /// Per training row and column: the mean squared difference to its k neighbours on that
    /// column, row-major like `points`: how spread a neighbourhood is along each feature, the
    /// yardstick of [`LofModel::attribution`].
    pub spread: Vec<f32>,
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
/// Largest magnitude of a value the single-precision filter accepts: squared differences stay
/// far from `f32::MAX`. Rows or queries with larger (or non-finite) values are scanned exactly.
const FILTER_RANGE: f64 = 1e15;

/// Exhaustive search in two passes that together give exactly the double-precision answer.
///
/// The filter pass computes every distance in single precision (twice the lanes per vector
/// instruction, half the memory) over the training rows kept in blocks of [`LANES`], each
/// block stored dimension by dimension, with the widest instructions the CPU has (chosen at run
/// time). Then, per query, it keeps each row whose single-precision distance is, within a proven
/// rounding bound, possibly no farther than the k-th nearest (starting from a limit taken from a
/// sample of the rows): a row it drops is certainly beaten by k others.
/// The exact pass computes the survivors' distances in double precision, summing squared
/// differences in dimension order, and picks the k nearest (ties to the lower row), so results
/// are bit-identical to a plain row-by-row scan.
pub struct BruteIndex {
    dims: usize,
    rows: usize,
    /// Row-major training rows, for the exact pass.
    points: Vec<f64>,
    /// The rows rounded to single precision, in blocks of [`LANES`], dimension by dimension.
    blocks: Vec<f32>,
    /// Upper bound of the rows' Euclidean norms, `None` when a value is outside
    /// [`FILTER_RANGE`] (then every query is scanned exactly).
    max_norm: Option<f64>,
    /// The widest vector instructions this CPU has (AVX2 where present), found once.
    arch: pulp::Arch,
}

impl BruteIndex {
    pub fn new(points: &[f64], dims: usize) -> Self {
        let rows = points.len().checked_div(dims).unwrap_or(0);
        // Padding lanes hold NaN: a NaN distance is never within a limit.
        let mut blocks = vec![f32::NAN; rows.div_ceil(2 * LANES) * 2 * dims * LANES];
        for (i, row) in points.chunks_exact(dims.max(1)).enumerate() {
            let (block, lane) = (i / LANES, i % LANES);
            for (d, &v) in row.iter().enumerate() {
                blocks[(block * dims + d) * LANES + lane] = v as f32;
            }
        }
        let max_norm = points
            .chunks_exact(dims.max(1))
            .try_fold(0.0f64, |max, row| Some(max.max(norm_in_range(row)?)));
        Self {
            dims,
            rows,
            points: points[..rows * dims].to_vec(),
            blocks,
            max_norm,
            arch: pulp::Arch::new(),
        }
    }

    /// The `k` nearest rows to `q` as (distance, row), nearest first; ties go to the lower row.
    pub fn nearest(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
        if self.filterable(q) {
            SCAN_BUFFERS.with_borrow_mut(|buffers| {
                self.arch.dispatch(Scan {
                    index: self,
                    queries: q,
                    k,
                    outs: std::slice::from_mut(out),
                    buffers,
                })
            });
        } else {
            self.exact_scan(q, k, out);
        }
    }

    /// [`Self::nearest`] for each row of row-major `queries`, into `outs[i]`. Queries are scanned
    /// in groups, so each block of training rows is read from memory once per group, not once
    /// per query.
    pub fn nearest_many(&self, queries: &[f64], k: usize, outs: &mut Vec<Vec<(f64, u32)>>) {
        let dims = self.dims.max(1);
        outs.resize_with(queries.len() / dims, Vec::new);
        for (group, outs) in queries.chunks(GROUP * dims).zip(outs.chunks_mut(GROUP)) {
            if self.filterable(group) {
                SCAN_BUFFERS.with_borrow_mut(|buffers| {
                    self.arch.dispatch(Scan {
                        index: self,
                        queries: group,
                        k,
                        outs,
                        buffers,
                    })
                });
            } else {
                for (q, out) in group.chunks_exact(dims).zip(outs) {
                    self.nearest(q, k, out);
                }
            }
        }
    }

    fn filterable(&self, queries: &[f64]) -> bool {
        self.max_norm.is_some() && queries.iter().all(|v| v.abs() <= FILTER_RANGE)
    }

    /// Squared distance from `q` to training row `row`, in dimension order.
    fn exact_distance(&self, row: usize, q: &[f64]) -> f64 {
        let x = &self.points[row * self.dims..(row + 1) * self.dims];
        x.iter().zip(q).fold(0.0, |s, (&x, &q)| {
            let t = x - q;
            s + t * t
        })
    }

    /// Squared distances from `q` to the rows in the low 32 bits of `keys`, into `out`. Four
    /// rows at a time: four independent chains of additions, each in dimension order.
    fn exact_distances(&self, q: &[f64], keys: &[u64], out: &mut Vec<(f64, u32)>) {
        let row = |key: u64| {
            let at = (key as u32) as usize * self.dims;
            &self.points[at..at + self.dims]
        };
        let mut fours = keys.chunks_exact(4);
        for four in &mut fours {
            let rows = [row(four[0]), row(four[1]), row(four[2]), row(four[3])];
            let mut sums = [0.0f64; 4];
            for (d, &q) in q.iter().enumerate() {
                for (s, x) in sums.iter_mut().zip(rows) {
                    let t = x[d] - q;
                    *s += t * t;
                }
            }
            out.extend(sums.into_iter().zip(four).map(|(s, &key)| (s, key as u32)));
        }
        out.extend(
            fours
                .remainder()
                .iter()
                .map(|&key| (self.exact_distance((key as u32) as usize, q), key as u32)),
        );
    }

    /// The double-precision scan alone, for values the filter cannot take.
    fn exact_scan(&self, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
        out.clear();
        if q.len() != self.dims {
            return;
        }
        out.extend(
            (0..self.rows)
                .map(|row| (self.exact_distance(row, q), row as u32))
                .filter(|&(d2, _)| d2 < f64::INFINITY),
        );
        finish(out, k);
    }

    /// Filters the training rows for each of the row-major `queries` (at most [`GROUP`], all
    /// within [`FILTER_RANGE`]), then picks each one's k nearest exactly.
    #[inline(always)]
    fn scan(
        &self,
        queries: &[f64],
        k: usize,
        outs: &mut [Vec<(f64, u32)>],
        buffers: &mut ScanBuffers,
    ) {
        for out in outs.iter_mut() {
            out.clear();
        }
        let k = k.min(self.rows);
        let Some(max_norm) = self.max_norm else {
            return;
        };
        if k == 0 || self.dims == 0 || queries.len() != outs.len() * self.dims {
            return;
        }
        let bound = RoundingBound::new(self.dims);
        let ScanBuffers {
            filters,
            fours,
            distances,
            sample,
        } = buffers;
        let queried = queries.len() / self.dims;
        if filters.len() < queried {
            filters.resize_with(queried, Filter::default);
        }
        let filters = &mut filters[..queried];
        for (filter, q) in filters.iter_mut().zip(queries.chunks_exact(self.dims)) {
            filter.reset(q, max_norm, k);
        }
        // Up to four queries at a time, in single precision, dimension by dimension.
        let groups = queried.div_ceil(4);
        if fours.len() < groups {
            fours.resize_with(groups, Vec::new);
        }
        let fours = &mut fours[..groups];
        for (four, into) in queries.chunks(4 * self.dims).zip(fours.iter_mut()) {
            let n = four.len() / self.dims;
            into.clear();
            into.extend((0..four.len()).map(|i| four[(i % n) * self.dims + i / n] as f32));
        }
        // Pass one: every single-precision distance, query by query, in row order.
        let stride = self.dims * LANES;
        let padded = self.blocks.len() / self.dims;
        distances.clear();
        distances.resize(queried * padded / (2 * LANES), [[0.0f32; LANES]; 2]);
        let per_query = padded / (2 * LANES);
        for (pair, blocks) in self.blocks.chunks_exact(2 * stride).enumerate() {
            let (first, second) = blocks.split_at(stride);
            for (four, q) in fours.iter().enumerate() {
                let d: &[[[f32; LANES]; 2]] = match q.len() / self.dims {
                    4 => &block_pair_distances::<4>(first, second, q),
                    3 => &block_pair_distances::<3>(first, second, q),
                    2 => &block_pair_distances::<2>(first, second, q),
                    _ => &block_pair_distances::<1>(first, second, q),
                };
                for (i, d) in d.iter().enumerate() {
                    distances[(4 * four + i) * per_query + pair] = *d;
                }
            }
        }
        // Pass two, per query: a limit from a sample, the rows within it, the k nearest exactly.
        for (((filter, q), out), distances) in filters
            .iter_mut()
            .zip(queries.chunks_exact(self.dims))
            .zip(outs)
            .zip(distances.chunks_exact(per_query))
        {
            let sampled = sample_distance(distances, k, sample);
            filter.limit = bound.limit(sampled, filter.slack);
            self.offer_all(distances, k, &bound, filter);
            // The rows dropped by the sample's limit are certainly farther than every row within
            // the sampled distance; that is enough only if k rows are.
            if filter.len < k || filter.shrink(k, &bound) > sampled {
                filter.limit = f32::INFINITY;
                filter.len = 0;
                self.offer_all(distances, k, &bound, filter);
                if filter.len > k {
                    filter.shrink(k, &bound);
                }
            }
            self.exact_distances(q, filter.kept(), out);
            finish(out, k);
        }
    }

    /// Offers every block pair's distances to a query's filter, in row order.
    #[inline(always)]
    fn offer_all(
        &self,
        distances: &[[[f32; LANES]; 2]],
        k: usize,
        bound: &RoundingBound,
        filter: &mut Filter,
    ) {
        for (pair, d) in distances.iter().enumerate() {
            self.offer(d, pair * 2 * LANES, k, bound, filter);
        }
    }

    /// Offers a block pair's single-precision distances to a query's filter.
    #[inline(always)]
    fn offer(
        &self,
        pair: &[[f32; LANES]; 2],
        first_row: usize,
        k: usize,
        bound: &RoundingBound,
        filter: &mut Filter,
    ) {
        let limit = filter.limit;
        if !pair
            .iter()
            .flatten()
            .fold(false, |any, &d2| any | (d2 <= limit))
        {
            return;
        }
        // Every lane is written and the length moves only past those within the limit: no
        // branch to mispredict. `keys` always has room for a block pair past `len`.
        let mut len = filter.len;
        for (lane, &d2) in pair.iter().flatten().enumerate() {
            filter.keys[len] = u64::from(d2.to_bits()) << 32 | (first_row + lane) as u64;
            len += usize::from(d2 <= limit);
        }
        filter.len = len;
        if len >= filter.shrink_at {
            filter.shrink(k, bound);
        } else if filter.limit == f32::INFINITY && len >= k {
            let farthest = filter.kept().iter().max().map_or(0, |&key| key >> 32);
            filter.limit = bound.limit(f32::from_bits(farthest as u32), filter.slack);
        }
    }
}

/// A distance from the first row of each block pair: the sample's `⌈3k / 16⌉`-th nearest, which
/// about 3k rows are expected to be within. Its limit is usually a little above that of the k-th
/// nearest, so few rows are kept before the first shrink.
fn sample_distance(distances: &[[[f32; LANES]; 2]], k: usize, sample: &mut Vec<u32>) -> f32 {
    sample.clear();
    sample.extend(distances.iter().map(|d| d[0][0].to_bits()));
    if sample.is_empty() {
        return f32::INFINITY;
    }
    let nth = (3 * k).div_ceil(2 * LANES).clamp(1, sample.len()) - 1;
    let (_, nth, _) = sample.select_nth_unstable(nth);
    f32::from_bits(*nth)
}

/// Euclidean norm of `row`, rounded up, if every value is within [`FILTER_RANGE`].
fn norm_in_range(row: &[f64]) -> Option<f64> {
    row.iter()
        .all(|v| v.abs() <= FILTER_RANGE)
        .then(|| row.iter().map(|v| v * v).sum::<f64>().sqrt() * (1.0 + 1e-12))
}

/// One query's filter: the rows that may be among its k nearest, each as a key with the
/// single-precision squared distance in the high 32 bits (so keys sort by distance, then row)
/// and the row in the low 32 bits.
#[derive(Default)]
struct Filter {
    /// Bound of the rounding error's effect on a distance: `2.01 u (|row| + |query|)`.
    slack: f64,
    /// Rows farther than this (single precision) are certainly not among the k nearest.
    limit: f32,
    /// The first `len` are the kept rows; room for a block pair follows.
    keys: Vec<u64>,
    len: usize,
    shrink_at: usize,
}

impl Filter {
    /// Makes this the filter of a new query (its keys' memory kept from the last).
    fn reset(&mut self, q: &[f64], max_norm: f64, k: usize) {
        let norm = norm_in_range(q).unwrap_or(f64::INFINITY);
        self.slack = 2.01 * f64::from(f32::EPSILON / 2.0) * (max_norm + norm) + SUBNORMAL_SLACK;
        self.limit = f32::INFINITY;
        // Only the first `len` are ever read, and each is written first.
        self.keys.resize(4 * k + 2 * LANES, 0);
        self.len = 0;
        self.shrink_at = 4 * k;
    }

    fn kept(&self) -> &[u64] {
        &self.keys[..self.len]
    }

    /// Keeps the rows within the limit set by the k-th nearest so far (never loosening it), and
    /// returns that k-th distance.
    fn shrink(&mut self, k: usize, bound: &RoundingBound) -> f32 {
        let (_, kth, _) = self.keys[..self.len].select_nth_unstable(k - 1);
        let kth = f32::from_bits((*kth >> 32) as u32);
        let limit = bound.limit(kth, self.slack).min(self.limit);
        let mut len = 0;
        for i in 0..self.len {
            let key = self.keys[i];
            self.keys[len] = key;
            len += usize::from(f32::from_bits((key >> 32) as u32) <= limit);
        }
        self.limit = limit;
        self.len = len;
        // Many rows at one distance must not make every later offer shrink again.
        if 2 * len > self.shrink_at {
            self.shrink_at = 2 * len;
            self.keys.resize(self.shrink_at + 2 * LANES, 0);
        }
        kth
    }
}

/// Covers single-precision rounding below the normal range (absolute, not relative, error).
const SUBNORMAL_SLACK: f64 = 1e-30;

/// Relative error bounds of a squared distance summed in single precision (a multiply and an
/// add per dimension) and in double precision (a subtract, multiply and add per dimension):
/// `γ(n) = n u / (1 - n u)`.
struct RoundingBound {
    single: f64,
    double: f64,
}

impl RoundingBound {
    fn new(dims: usize) -> Self {
        let gamma = |n: f64, u: f64| n * u / (1.0 - n * u);
        let n = 3.0 * dims as f64 + 3.0;
        Self {
            single: gamma(n, f64::from(f32::EPSILON / 2.0)),
            double: gamma(n, f64::EPSILON / 2.0),
        }
    }

    /// The largest single-precision distance a row may have and still be no farther, exactly,
    /// than a row whose single-precision distance is `kth`.
    ///
    /// With `e` the single-precision difference vector and `v` the exact one,
    /// `|e - v| <= slack` and `d32 / (1 + γs) <= |e|² <= d32 / (1 - γs)`; the double-precision
    /// distance is within `(1 ± γd) |v|²`. A row is certainly farther than the k-th when
    /// `(1 - γd) (sqrt(d32 / (1 + γs)) - slack)² > (1 + γd) (sqrt(kth / (1 - γs)) + slack)²`.
    fn limit(&self, kth: f32, slack: f64) -> f32 {
        let (s, d) = (self.single, self.double);
        let kth_exact = (1.0 + d) * ((f64::from(kth) / (1.0 - s)).sqrt() + slack).powi(2);
        // 1e-9 covers this arithmetic's own rounding; 2u that of the conversion to f32, which
        // must not go below the limit.
        let limit = (1.0 + s) * ((kth_exact / (1.0 - d)).sqrt() + slack).powi(2) * (1.0 + 1e-9);
        (limit * (1.0 + f64::from(f32::EPSILON))) as f32
    }
}

/// Squared single-precision distances from each of `Q` queries (stored dimension by dimension)
/// to the rows of two consecutive blocks.
#[inline(always)]
fn block_pair_distances<const Q: usize>(
    first: &[f32],
    second: &[f32],
    queries: &[f32],
) -> [[[f32; LANES]; 2]; Q] {
    let mut acc = [[[0.0f32; LANES]; 2]; Q];
    for ((a, b), q) in first
        .chunks_exact(LANES)
        .zip(second.chunks_exact(LANES))
        .zip(queries.chunks_exact(Q))
    {
        let (Ok(a), Ok(b), Ok(q)) = (
            <&[f32; LANES]>::try_from(a),
            <&[f32; LANES]>::try_from(b),
            <&[f32; Q]>::try_from(q),
        ) else {
            continue;
        };
        for (acc, &qd) in acc.iter_mut().zip(q) {
            for (s, &x) in acc[0].iter_mut().zip(a) {
                let t = x - qd;
                *s = t.mul_add(t, *s);
            }
            for (s, &x) in acc[1].iter_mut().zip(b) {
                let t = x - qd;
                *s = t.mul_add(t, *s);
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
    buffers: &'a mut ScanBuffers,
}

/// The scan's working memory — a filter per query, the queries in single precision, their
/// distances to every row, the sample — kept per thread between scans: the stream scores one
/// event at a time, and allocating these for each (six blocks, about 10 KB) cost more than
/// the arithmetic that fills them.
#[derive(Default)]
struct ScanBuffers {
    filters: Vec<Filter>,
    fours: Vec<Vec<f32>>,
    distances: Vec<[[f32; LANES]; 2]>,
    sample: Vec<u32>,
}

thread_local! {
    static SCAN_BUFFERS: std::cell::RefCell<ScanBuffers> = std::cell::RefCell::default();
}

/// (distance, row) order: nearer first, ties to the lower row.
fn by_distance_then_row(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// Keeps the `k` nearest of `candidates` (squared distances), sorted, as distances.
fn finish(candidates: &mut Vec<(f64, u32)>, k: usize) {
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k, by_distance_then_row);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(by_distance_then_row);
    for c in candidates.iter_mut() {
        c.0 = c.0.sqrt();
    }
}

impl pulp::WithSimd for Scan<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        self.index
            .scan(self.queries, self.k, self.outs, self.buffers);
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
        let spread = points
            .chunks_exact(dims)
            .zip(&neighbours)
            .flat_map(|(row, nb)| squared_gaps(&points, dims, row, nb).map(|v| v as f32))
            .collect();
        Ok(Self {
            k,
            dims,
            points,
            k_distance,
            lrd,
            training_lof,
            spread,
        })
    }

    /// How many training rows every event is compared with: what most of LOF's cost per event
    /// grows with.
    pub fn reference_rows(&self) -> usize {
        self.points.len().checked_div(self.dims).unwrap_or(0)
    }

    /// Each column's part in `q`'s distance from its neighbours, beyond what those neighbours
    /// show among their own: the mean squared gap to the neighbours on the column, less the
    /// neighbours' own mean squared gap on it, clipped at 0. A column on which `q` sits as close
    /// to its neighbours as they sit to theirs explains nothing of its outlier factor.
    pub fn attribution(&self, q: &[f64], neighbours: &[(f64, u32)]) -> Vec<f64> {
        let mut own = vec![0.0; self.dims];
        for &(_, j) in neighbours {
            let start = j as usize * self.dims;
            if let Some(s) = self.spread.get(start..start + self.dims) {
                for (o, v) in own.iter_mut().zip(s) {
                    *o += f64::from(*v);
                }
            }
        }
        let n = neighbours.len().max(1) as f64;
        squared_gaps(&self.points, self.dims, q, neighbours)
            .zip(own)
            .map(|(gap, own)| (gap - own / n).max(0.0))
            .collect()
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

/// Per column, the mean squared difference between `row` and its `neighbours`.
fn squared_gaps<'a>(
    points: &'a [f64],
    dims: usize,
    row: &'a [f64],
    neighbours: &'a [(f64, u32)],
) -> impl Iterator<Item = f64> + 'a {
    let n = neighbours.len().max(1) as f64;
    (0..dims).map(move |d| {
        neighbours
            .iter()
            .map(|&(_, j)| {
                let gap = row[d] - points[j as usize * dims + d];
                gap * gap
            })
            .sum::<f64>()
            / n
    })
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

    /// Every distance in dimension order in double precision, sorted: what the scan must equal.
    fn plain_scan(points: &[f64], dims: usize, q: &[f64], k: usize) -> Vec<(f64, u32)> {
        let mut all: Vec<(f64, u32)> = points
            .chunks_exact(dims)
            .enumerate()
            .map(|(i, x)| {
                let d2 = x.iter().zip(q).fold(0.0, |s, (x, q)| s + (x - q) * (x - q));
                (d2, i as u32)
            })
            .filter(|d| d.0 < f64::INFINITY)
            .collect();
        all.sort_by(by_distance_then_row);
        all.truncate(k);
        all.iter().map(|&(d2, i)| (d2.sqrt(), i)).collect()
    }

    #[test]
    fn single_precision_filter_keeps_the_exact_double_precision_neighbours_and_ties() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let dims = 29;
        // Rows that single precision cannot tell apart (differences of 1e-9 at magnitude 1e3),
        // exact repeats, one-hot columns, and ordinary spread.
        let base: Vec<f64> = (0..dims).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let mut points = Vec::new();
        for i in 0..700 {
            let row: Vec<f64> = match i % 4 {
                0 => base
                    .iter()
                    .map(|b| b + rng.gen_range(-1e-9..1e-9))
                    .collect(),
                1 => base
                    .iter()
                    .map(|b| b * 1e3 + f64::from(i % 3) * 1e-9)
                    .collect(),
                2 => base.clone(),
                _ => (0..dims)
                    .map(|d| {
                        if d >= 20 {
                            f64::from(rng.gen_range(0..2u8))
                        } else {
                            rng.gen_range(-5.0..5.0)
                        }
                    })
                    .collect(),
            };
            points.extend(row);
        }
        let index = BruteIndex::new(&points, dims);
        let mut queries: Vec<Vec<f64>> = vec![
            base.clone(),
            base.iter().map(|b| b * 1e3).collect(),
            base.iter().map(|b| b + 1e-8).collect(),
        ];
        queries.extend((0..20).map(|_| (0..dims).map(|_| rng.gen_range(-4.0..4.0)).collect()));
        let mut huge = base.clone();
        huge[3] = 1e200; // beyond the filter's range: scanned exactly
        queries.push(huge);
        let mut not_a_number = base.clone();
        not_a_number[0] = f64::NAN;
        queries.push(not_a_number);
        for k in [1, 5, 20, 200] {
            let flat: Vec<f64> = queries.concat();
            let mut many = Vec::new();
            index.nearest_many(&flat, k, &mut many);
            let mut one = Vec::new();
            for (i, (q, batch)) in queries.iter().zip(&many).enumerate() {
                let want = plain_scan(&points, dims, q, k);
                index.nearest(q, k, &mut one);
                assert_eq!(one, want, "query {i}, k {k}");
                assert_eq!(batch, &want, "query {i} in a batch, k {k}");
            }
        }
    }

    #[test]
    fn a_sample_nearer_than_the_kth_neighbour_falls_back_to_an_unlimited_scan() {
        // The sampled rows (the first of every 16) are the query's only near rows: fewer than k
        // are within the sample's limit. Then 30 rows a few single-precision steps beyond the
        // sampled distance: more than k within its limit, but not within the distance itself.
        let near_sample = |i: usize| i % 16 == 0 && i < 64;
        for band in [false, true] {
            let points: Vec<f64> = (0..400)
                .flat_map(|i| {
                    let x = match i {
                        _ if near_sample(i) => 1.0,
                        1..=40 if band && !near_sample(i) => 1.0 + 2e-7,
                        _ => 10.0 + i as f64,
                    };
                    [x, 0.0]
                })
                .collect();
            let index = BruteIndex::new(&points, 2);
            let (mut one, mut many) = (Vec::new(), Vec::new());
            let q = [0.0, 0.0];
            index.nearest(&q, 20, &mut one);
            index.nearest_many(&[q, q, q].concat(), 20, &mut many);
            let want = plain_scan(&points, 2, &q, 20);
            assert_eq!(one, want, "band {band}");
            assert!(many.iter().all(|m| *m == want), "band {band}");
        }
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
