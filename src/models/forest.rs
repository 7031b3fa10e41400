//! Isolation forest: trained with `extended-isolation-forest`, then flattened into contiguous node
//! arrays with each leaf's path length precomputed. The flat copy gives bit-identical scores to
//! the crate's `Forest::score` (tested) at a fraction of the cost.
//!
//! The crate is generic over a const dimension, so training dispatches the runtime width to a
//! monomorphised `Forest<f64, N>`; scoring the flat copy needs no such dispatch.

use extended_isolation_forest::{Forest, ForestOptions};
use serde::{Deserialize, Serialize};

use super::ModelError;

/// Average path length of an unsuccessful binary-search-tree search over `n` points, computed
/// exactly as the crate does so that flattened scores are bit-identical.
fn c_factor(n: usize) -> f64 {
    let n = n as f64;
    2.0 * ((n - 1.0).log(std::f64::consts::E) + 0.577_215_664_9) - (2.0 * (n - 1.0) / n)
}

/// One node. A leaf has `terms == 0` and its full path length in `n`. A split with one
/// non-zero normal coordinate keeps it inline (`dim`, `n`, `p`); a wider hyperplane keeps its
/// coordinates in [`FlatForest::terms`] from index `dim`. The left child follows its parent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub dim: u32,
    pub terms: u32,
    pub right: u32,
    pub n: f64,
    pub p: f64,
}

/// One non-zero coordinate of a hyperplane's normal, with the intercept on that axis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Term {
    pub dim: u32,
    pub n: f64,
    pub p: f64,
}

/// A trained isolation forest in flat form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct FlatForest {
    pub dims: usize,
    /// Normaliser `c(sample_size)` of the anomaly score.
    pub c: f64,
    pub roots: Vec<u32>,
    pub nodes: Vec<Node>,
    pub terms: Vec<Term>,
    /// Derived from `nodes` when every split is on one axis (extension level 0); not stored.
    #[serde(skip)]
    axis: Option<AxisWalk>,
}

/// What `forest.json` holds: a [`FlatForest`] without its derived walk table.
#[derive(Deserialize)]
struct Stored {
    dims: usize,
    c: f64,
    roots: Vec<u32>,
    nodes: Vec<Node>,
    terms: Vec<Term>,
}

impl From<Stored> for FlatForest {
    fn from(s: Stored) -> Self {
        let axis = AxisWalk::build(&s.roots, &s.nodes);
        Self {
            dims: s.dims,
            c: s.c,
            roots: s.roots,
            nodes: s.nodes,
            terms: s.terms,
            axis,
        }
    }
}

/// An axis-parallel forest laid out for walking several rows in lockstep without branches: every
/// node names both children, a leaf names itself twice, so a row that reached its leaf stays
/// there while the others go on, and every row takes the same number of steps (the tree's
/// depth). Branchy walks mispredict about every other split; these do not, and the rows' loads
/// overlap.
#[derive(Debug, Clone, PartialEq)]
struct AxisWalk {
    steps: Vec<Step>,
    /// Steps from each tree's root to its deepest leaf, in the order of `roots`.
    depths: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    dim: u32,
    left: u32,
    right: u32,
    n: f64,
    p: f64,
}

impl AxisWalk {
    /// Rows walked together: enough independent chains to hide the load latency of each step.
    const LANES: usize = 8;

    fn build(roots: &[u32], nodes: &[Node]) -> Option<Self> {
        if nodes.iter().any(|n| n.terms > 1) {
            return None;
        }
        // Children come after their parent, so one backward pass sees them first.
        let mut depth = vec![0u32; nodes.len()];
        let mut steps = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate().rev() {
            let at = i as u32;
            let step = if node.terms == 0 {
                Step {
                    dim: 0,
                    left: at,
                    right: at,
                    n: 0.0,
                    p: 0.0,
                }
            } else {
                let (left, right) = (i + 1, node.right as usize);
                if right <= left {
                    return None;
                }
                depth[i] = 1 + (*depth.get(left)?).max(*depth.get(right)?);
                Step {
                    dim: node.dim,
                    left: left as u32,
                    right: node.right,
                    n: node.n,
                    p: node.p,
                }
            };
            steps.push(step);
        }
        steps.reverse();
        let depths = roots
            .iter()
            .map(|&r| depth.get(r as usize).copied())
            .collect::<Option<_>>()?;
        Some(Self { steps, depths })
    }

    /// The node after `at` for row `x` (`at` itself at a leaf).
    #[inline(always)]
    fn next(&self, at: u32, x: &[f64]) -> u32 {
        let step = &self.steps[at as usize];
        let side = (x[step.dim as usize] - step.p) * step.n;
        if side <= 0.0 { step.left } else { step.right }
    }

    /// Adds the path length of each row of `block` in the tree at `root` to its total.
    fn add_path_lengths(
        &self,
        nodes: &[Node],
        root: u32,
        depth: u32,
        block: &[f64],
        width: usize,
        totals: &mut [f64],
    ) {
        for (rows, totals) in block
            .chunks(Self::LANES * width)
            .zip(totals.chunks_mut(Self::LANES))
        {
            let mut at = [root; Self::LANES];
            if totals.len() == Self::LANES {
                // A full block: a fixed count, so the rows' chains are fully unrolled.
                let xs: [&[f64]; Self::LANES] =
                    std::array::from_fn(|i| &rows[i * width..(i + 1) * width]);
                for _ in 0..depth {
                    for (a, x) in at.iter_mut().zip(xs) {
                        *a = self.next(*a, x);
                    }
                }
            } else {
                let at = &mut at[..totals.len()];
                for _ in 0..depth {
                    for (a, x) in at.iter_mut().zip(rows.chunks_exact(width)) {
                        *a = self.next(*a, x);
                    }
                }
            }
            for (total, &a) in totals.iter_mut().zip(at.iter()) {
                *total += nodes[a as usize].n;
            }
        }
    }
}

/// Mirror of the crate's serde layout, read from its own serialisation.
#[derive(Deserialize)]
struct CrateForest {
    avg_path_length_c: f64,
    trees: Vec<CrateTree>,
}

#[derive(Deserialize)]
struct CrateTree {
    root: CrateNode,
}

#[derive(Deserialize)]
enum CrateNode {
    Ex {
        num_samples: usize,
    },
    In {
        left: Box<CrateNode>,
        right: Box<CrateNode>,
        n: Vec<f64>,
        p: Vec<f64>,
    },
}

impl FlatForest {
    /// Flattens a forest from the crate's serde JSON.
    pub fn from_crate_json(json: &[u8]) -> Result<Self, ModelError> {
        let forest: CrateForest =
            serde_json::from_slice(json).map_err(|e| ModelError::Inconsistent(e.to_string()))?;
        let mut flat = Self {
            dims: 0,
            c: forest.avg_path_length_c,
            roots: Vec::with_capacity(forest.trees.len()),
            nodes: Vec::new(),
            terms: Vec::new(),
            axis: None,
        };
        for tree in &forest.trees {
            flat.roots.push(flat.nodes.len() as u32);
            flat.push(&tree.root, 0);
        }
        flat.axis = AxisWalk::build(&flat.roots, &flat.nodes);
        Ok(flat)
    }

    fn push(&mut self, node: &CrateNode, depth: usize) {
        match node {
            CrateNode::Ex { num_samples } => {
                // The crate adds 1.0 per level on the way back up: replay that order exactly.
                let mut length = if *num_samples <= 1 {
                    0.0
                } else {
                    c_factor(*num_samples)
                };
                for _ in 0..depth {
                    length += 1.0;
                }
                self.nodes.push(Node {
                    dim: 0,
                    terms: 0,
                    right: 0,
                    n: length,
                    p: 0.0,
                });
            }
            CrateNode::In { left, right, n, p } => {
                self.dims = self.dims.max(n.len());
                let nonzero: Vec<Term> = n
                    .iter()
                    .zip(p)
                    .enumerate()
                    .filter(|(_, (n, _))| **n != 0.0)
                    .map(|(d, (n, p))| Term {
                        dim: d as u32,
                        n: *n,
                        p: *p,
                    })
                    .collect();
                let at = self.nodes.len();
                let node = match nonzero.as_slice() {
                    [single] => Node {
                        dim: single.dim,
                        terms: 1,
                        right: 0,
                        n: single.n,
                        p: single.p,
                    },
                    many => {
                        let start = self.terms.len() as u32;
                        self.terms.extend_from_slice(many);
                        // An all-zero normal sends everything left, as the crate does; two
                        // zero terms keep that meaning here.
                        let count = many.len().max(2) as u32;
                        if many.is_empty() {
                            self.terms.extend(
                                [Term {
                                    dim: 0,
                                    n: 0.0,
                                    p: 0.0,
                                }; 2],
                            );
                        }
                        Node {
                            dim: start,
                            terms: count,
                            right: 0,
                            n: 0.0,
                            p: 0.0,
                        }
                    }
                };
                self.nodes.push(node);
                self.push(left, depth + 1);
                self.nodes[at].right = self.nodes.len() as u32;
                self.push(right, depth + 1);
            }
        }
    }

    /// Anomaly score `2^(-E[h(x)] / c)` in (0, 1]; higher is more anomalous.
    pub fn score(&self, x: &[f64]) -> f64 {
        let total = self
            .roots
            .iter()
            .fold(0.0, |total, &root| total + self.path_length(root, x));
        self.normalise(total)
    }

    /// [`Self::score`] of each row of row-major `rows` of width `width`, bit-identical to scoring
    /// them one by one. Tree by tree over blocks of rows: one tree's nodes (about 16 KB) stay in
    /// L1 while the block walks it, where a row at a time walks all 1.6 MB of trees.
    pub fn score_many(&self, rows: &[f64], width: usize) -> Vec<f64> {
        const BLOCK: usize = 256;
        let width = width.max(1);
        let mut scores = Vec::with_capacity(rows.len() / width);
        for block in rows.chunks(BLOCK * width) {
            let n = block.len() / width;
            let block = &block[..n * width];
            let mut totals = [0.0f64; BLOCK];
            let totals = &mut totals[..n];
            match &self.axis {
                Some(walk) => {
                    for (&root, &depth) in self.roots.iter().zip(&walk.depths) {
                        walk.add_path_lengths(&self.nodes, root, depth, block, width, totals);
                    }
                }
                None => {
                    for &root in &self.roots {
                        for (total, x) in totals.iter_mut().zip(block.chunks_exact(width)) {
                            *total += self.path_length(root, x);
                        }
                    }
                }
            }
            scores.extend(totals.iter().map(|&t| self.normalise(t)));
        }
        scores
    }

    /// The path length of `x` in the tree at `root`, with the leaf's expected remainder.
    #[inline]
    fn path_length(&self, root: u32, x: &[f64]) -> f64 {
        let mut i = root as usize;
        loop {
            let node = &self.nodes[i];
            if node.terms == 0 {
                return node.n;
            }
            i = if self.side(node, x) <= 0.0 {
                i + 1
            } else {
                node.right as usize
            };
        }
    }

    /// Which side of a split `x` is on: left at or below zero, as the crate decides.
    #[inline(always)]
    fn side(&self, node: &Node, x: &[f64]) -> f64 {
        match node.terms {
            1 => (x[node.dim as usize] - node.p) * node.n,
            k => self.terms[node.dim as usize..(node.dim + k) as usize]
                .iter()
                .fold(0.0, |sum, t| sum + (x[t.dim as usize] - t.p) * t.n),
        }
    }

    fn normalise(&self, total: f64) -> f64 {
        let eh = total / self.roots.len() as f64;
        2.0_f64.powf(-eh / self.c)
    }
}

/// Options for training; `samples` is capped at the number of rows, as scikit-learn does.
pub fn options(trees: usize, samples: usize, extension_level: usize, rows: usize) -> ForestOptions {
    ForestOptions {
        n_trees: trees,
        sample_size: samples.min(rows),
        max_tree_depth: None,
        extension_level,
    }
}

fn train_n<const N: usize>(rows: &[Vec<f64>], opts: &ForestOptions) -> Result<Vec<u8>, ModelError> {
    let data: Vec<[f64; N]> = rows
        .iter()
        .map(|r| <[f64; N]>::try_from(r.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(|_| ModelError::Inconsistent("training rows of unequal width".into()))?;
    let forest = Forest::<f64, N>::from_slice(&data, opts)
        .map_err(|e| ModelError::Training(format!("isolation forest: {e}")))?;
    serde_json::to_vec(&forest).map_err(|e| ModelError::Inconsistent(e.to_string()))
}

macro_rules! dispatch_width {
    ($width:expr, $rows:expr, $opts:expr, [$($n:literal)+]) => {
        match $width {
            $($n => train_n::<$n>($rows, $opts),)+
            w => Err(ModelError::Training(format!("isolation forest over {w} columns is not supported (1..=32)"))),
        }
    };
}

/// Trains with the crate (its RNG cannot be seeded) and returns the crate's own serialisation.
///
/// The rows are rounded to `f32` precision first. The crate draws each split with rand 0.8's
/// `Uniform::new(min, max)`, which loops about `|min| / (max - min)` times: two values a few ulps
/// apart (sin and cos of symmetric angles produce exactly those) make it spin for hours. In
/// `f32` precision distinct values are at least 2^-23 apart relatively, which bounds that loop to
/// milliseconds; the lost precision is far below anything an anomaly depends on.
pub fn train_crate_json(rows: &[Vec<f64>], opts: &ForestOptions) -> Result<Vec<u8>, ModelError> {
    let rounded: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().map(|&x| f64::from(x as f32)).collect())
        .collect();
    let width = rows.first().map_or(0, Vec::len);
    dispatch_width!(width, &rounded, opts, [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32])
}

/// Trains a forest on `rows` and returns it flattened.
pub fn train(rows: &[Vec<f64>], opts: &ForestOptions) -> Result<FlatForest, ModelError> {
    FlatForest::from_crate_json(&train_crate_json(rows, opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn inliers(n: usize, rng: &mut ChaCha8Rng) -> Vec<[f64; 3]> {
        (0..n)
            .map(|_| {
                [
                    rng.gen_range(-4.0..4.0),
                    rng.gen_range(-4.0..4.0),
                    rng.gen_range(10.0..50.0),
                ]
            })
            .collect()
    }

    #[test]
    fn flat_forest_scores_one_by_one_and_in_batches_equal_the_crate_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let data = inliers(2000, &mut rng);
        for extension_level in [0, 2] {
            let forest =
                Forest::<f64, 3>::from_slice(&data, &options(100, 256, extension_level, 2000))
                    .unwrap_or_else(|e| panic!("{e}"));
            let json = serde_json::to_vec(&forest).unwrap_or_default();
            let flat = FlatForest::from_crate_json(&json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(flat.dims, 3);
            assert_eq!(flat.axis.is_some(), extension_level == 0);
            let stored = serde_json::to_vec(&flat).unwrap_or_default();
            let loaded: FlatForest =
                serde_json::from_slice(&stored).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(loaded, flat, "the walk table is rebuilt on load");
            let xs: Vec<[f64; 3]> = (0..2000)
                .map(|_| {
                    [
                        rng.gen_range(-8.0..8.0),
                        rng.gen_range(-8.0..8.0),
                        rng.gen_range(0.0..60.0),
                    ]
                })
                .collect();
            let many = flat.score_many(xs.as_flattened(), 3);
            assert_eq!(many.len(), xs.len());
            for (x, batch) in xs.iter().zip(many) {
                let want = forest.score(x).to_bits();
                assert_eq!(flat.score(x).to_bits(), want, "{x:?}");
                assert_eq!(batch.to_bits(), want, "{x:?} in a batch");
            }
        }
    }

    #[test]
    fn training_finishes_on_values_a_few_ulps_apart() {
        // sin(2π·8/12) and sin(2π·10/12) are equal in exact arithmetic, 2 ulps apart in f64.
        let a = (std::f64::consts::TAU * 8.0 / 12.0).sin();
        let b = (std::f64::consts::TAU * 10.0 / 12.0).sin();
        assert_ne!(a, b);
        let rows: Vec<Vec<f64>> = (0..64)
            .map(|i| vec![if i % 2 == 0 { a } else { b }, f64::from(i)])
            .collect();
        let forest =
            train(&rows, &options(50, 32, 0, rows.len())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(forest.roots.len(), 50);
    }

    #[test]
    fn planted_outliers_are_ranked_above_inliers() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let rows: Vec<Vec<f64>> = (0..1000)
            .map(|_| {
                (0..6)
                    .map(|_| rng.gen_range(-1.0..1.0) + rng.gen_range(-1.0..1.0))
                    .collect()
            })
            .collect();
        let forest =
            train(&rows, &options(100, 256, 0, rows.len())).unwrap_or_else(|e| panic!("{e}"));
        let mut labelled: Vec<(f64, bool)> = Vec::new();
        for _ in 0..500 {
            let x: Vec<f64> = (0..6)
                .map(|_| rng.gen_range(-1.0..1.0) + rng.gen_range(-1.0..1.0))
                .collect();
            labelled.push((forest.score(&x), false));
        }
        // Planted outliers: uniform over a box three times wider than the inliers' support.
        for _ in 0..25 {
            let x: Vec<f64> = (0..6).map(|_| rng.gen_range(-6.0..6.0)).collect();
            labelled.push((forest.score(&x), true));
        }
        let auc = super::super::roc_auc(&labelled);
        assert!(auc >= 0.95, "ROC-AUC {auc}");
    }
}
