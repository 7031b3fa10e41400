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
    Brute,
}

impl std::fmt::Debug for KnnIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KdTree(_) => "KdTree",
            Self::Brute => "Brute",
        })
    }
}

impl KnnIndex {
    /// Builds the requested index; widths above 32 fall back to the brute-force scan.
    pub fn build(kind: LofIndexKind, points: &[f64], dims: usize) -> Self {
        match kind {
            LofIndexKind::Brute => Self::Brute,
            LofIndexKind::Kdtree => kd_for_width!(dims, points, [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32])
                .map_or(Self::Brute, Self::KdTree),
        }
    }

    pub fn kind(&self) -> LofIndexKind {
        match self {
            Self::KdTree(_) => LofIndexKind::Kdtree,
            Self::Brute => LofIndexKind::Brute,
        }
    }

    /// The `k` nearest training rows to `q` as (distance, row), nearest first.
    pub fn nearest(
        &self,
        points: &[f64],
        dims: usize,
        q: &[f64],
        k: usize,
        out: &mut Vec<(f64, u32)>,
    ) {
        match self {
            Self::KdTree(tree) => tree.nearest(q, k, out),
            Self::Brute => brute_nearest(points, dims, q, k, out),
        }
    }
}

fn brute_nearest(points: &[f64], dims: usize, q: &[f64], k: usize, out: &mut Vec<(f64, u32)>) {
    out.clear();
    out.extend(points.chunks_exact(dims).enumerate().map(|(i, row)| {
        let d2: f64 = row.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
        (d2, i as u32)
    }));
    let k = k.min(out.len());
    if k == 0 {
        out.clear();
        return;
    }
    if k < out.len() {
        out.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        out.truncate(k);
    }
    out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for d in out.iter_mut() {
        d.0 = d.0.sqrt();
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
            index.nearest(&points, dims, row, k + 1, &mut buf);
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
        index.nearest(&self.points, self.dims, q, self.k, buf);
        let own = local_reachability_density(buf, &self.k_distance);
        mean_ratio(buf, &self.lrd, own)
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
    fn scores_equal_scikit_learn_novelty_lof_to_1e_9() {
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
            let index = KnnIndex::build(kind, &train, dims);
            assert_eq!(index.kind(), kind);
            let lof =
                LofModel::fit(train.clone(), dims, 20, &index).unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::new();
            let rows: Vec<&[f64]> = score.chunks_exact(dims).collect();
            assert_eq!(rows.len(), expected.len());
            for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
                let got = lof.score(&index, row, &mut buf);
                let rel = ((got - want) / want).abs();
                assert!(
                    rel <= 1e-9,
                    "{kind:?} row {i}: {got} vs scikit-learn {want}"
                );
            }
        }
    }

    #[test]
    fn kd_tree_and_brute_force_find_the_same_neighbours_with_repeated_values() {
        // One-hot style columns: many rows share values on every split axis.
        let points: Vec<f64> = (0..400)
            .flat_map(|i| [f64::from(i % 2), f64::from(i % 3 == 0), f64::from(i) * 0.01])
            .collect();
        let kd = KnnIndex::build(LofIndexKind::Kdtree, &points, 3);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for q in [[0.0, 1.0, 0.5], [1.0, 0.0, 3.3], [0.5, 0.5, 9.0]] {
            kd.nearest(&points, 3, &q, 10, &mut a);
            KnnIndex::Brute.nearest(&points, 3, &q, 10, &mut b);
            let da: Vec<f64> = a.iter().map(|x| x.0).collect();
            let db: Vec<f64> = b.iter().map(|x| x.0).collect();
            assert_eq!(da, db);
        }
    }
}
