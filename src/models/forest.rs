//! Isolation forest (Liu, Ting and Zhou, 2008; hyperplane splits for `extension_level > 0` as in
//! Hariri et al.'s extended isolation forest): trained here from a seed, so the same rows,
//! parameters and seed give the same trees, then flattened into contiguous node arrays with
//! each leaf's path length precomputed. The flat copy gives bit-identical scores to the trained
//! trees (tested) at a fraction of the cost, and keeps every node's training count so that a
//! score can be attributed to the features whose splits isolated the row.
//!
//! Trained by hand rather than with a crate: the crates at hand draw from an unseeded thread RNG
//! (a bank's model validation needs the same model from the same data) and are generic over a
//! compile-time width.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::ModelError;

/// Average path length of an unsuccessful binary-search-tree search over `n` points.
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
    /// Training rows of the tree's sample that reached this node.
    pub size: u32,
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
    /// Derived from `nodes` and `terms` when splits have at most [`PLANE_TERMS`] terms; not
    /// stored.
    #[serde(skip)]
    walk: Option<Lockstep>,
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
        let walk = Lockstep::build(&s.roots, &s.nodes, &s.terms);
        Self {
            dims: s.dims,
            c: s.c,
            roots: s.roots,
            nodes: s.nodes,
            terms: s.terms,
            walk,
        }
    }
}

/// A forest laid out for walking several rows in lockstep without branches: every node names
/// both children, a leaf names itself twice, so a row that reached its leaf stays there while the
/// others go on, and every row takes the same number of steps (the tree's depth). Branchy walks
/// mispredict about every other split; these do not, and the rows' loads overlap. `T` is the
/// most terms a split has: 1 for an axis-parallel forest, up to [`PLANE_TERMS`] for hyperplanes
/// (shorter ones padded with zero terms, which leave every side unchanged).
#[derive(Debug, Clone, PartialEq)]
struct Walk<const T: usize> {
    steps: Vec<Step<T>>,
    /// Steps from each tree's root to its deepest leaf, in the order of `roots`.
    depths: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Step<const T: usize> {
    dim: [u32; T],
    left: u32,
    right: u32,
    n: [f64; T],
    p: [f64; T],
}

/// The widest hyperplane the lockstep walk lays out inline (extension level 3).
const PLANE_TERMS: usize = 4;

/// The lockstep layout of a forest, by the width of its splits.
#[derive(Debug, Clone, PartialEq)]
enum Lockstep {
    Axis(Walk<1>),
    Plane(Walk<PLANE_TERMS>),
}

impl Lockstep {
    fn build(roots: &[u32], nodes: &[Node], terms: &[Term]) -> Option<Self> {
        let widest = nodes.iter().map(|n| n.terms as usize).max().unwrap_or(0);
        if widest <= 1 {
            Walk::build(roots, nodes, terms).map(Self::Axis)
        } else if widest <= PLANE_TERMS {
            Walk::build(roots, nodes, terms).map(Self::Plane)
        } else {
            None
        }
    }
}

/// Rows walked together: enough independent chains to hide the load latency of each step.
const LANES: usize = 8;

impl<const T: usize> Walk<T> {
    fn build(roots: &[u32], nodes: &[Node], terms: &[Term]) -> Option<Self> {
        // Children come after their parent, so one backward pass sees them first.
        let mut depth = vec![0u32; nodes.len()];
        let mut steps = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate().rev() {
            let at = i as u32;
            let mut step = Step {
                dim: [0; T],
                left: at,
                right: at,
                n: [0.0; T],
                p: [0.0; T],
            };
            if node.terms > 0 {
                let (left, right) = (i + 1, node.right as usize);
                if right <= left || node.terms as usize > T {
                    return None;
                }
                depth[i] = 1 + (*depth.get(left)?).max(*depth.get(right)?);
                (step.left, step.right) = (left as u32, node.right);
                let inline = [Term {
                    dim: node.dim,
                    n: node.n,
                    p: node.p,
                }];
                let of_node = match node.terms {
                    1 => &inline[..],
                    k => terms.get(node.dim as usize..(node.dim + k) as usize)?,
                };
                for (j, t) in of_node.iter().enumerate() {
                    (step.dim[j], step.n[j], step.p[j]) = (t.dim, t.n, t.p);
                }
            }
            steps.push(step);
        }
        steps.reverse();
        let depths = roots
            .iter()
            .map(|&r| depth.get(r as usize).copied())
            .collect::<Option<_>>()?;
        Some(Self { steps, depths })
    }

    /// The node after `at` for row `x` (`at` itself at a leaf). The side is summed in term order
    /// from 0, as [`FlatForest::side`] and the grown trees do, so every decision is theirs.
    #[inline(always)]
    fn next(&self, at: u32, x: &[f64]) -> u32 {
        let step = &self.steps[at as usize];
        let mut side = 0.0;
        for j in 0..T {
            side += (x[step.dim[j] as usize] - step.p[j]) * step.n[j];
        }
        if side <= 0.0 { step.left } else { step.right }
    }

    /// The sum of `x`'s path lengths over every tree, added in tree order as
    /// [`FlatForest::score`] adds them, but walked [`LANES`] trees at a time: one row's walk of
    /// a tree is a chain of dependent loads from memory the row has not touched before, and
    /// eight independent chains overlap their waits.
    fn total(&self, forest: &FlatForest, x: &[f64]) -> f64 {
        let mut total = 0.0;
        for (roots, depths) in forest.roots.chunks(LANES).zip(self.depths.chunks(LANES)) {
            let depth = depths.iter().copied().max().unwrap_or(0);
            let mut at = [0u32; LANES];
            let at = &mut at[..roots.len()];
            at.copy_from_slice(roots);
            if let Ok(at) = <&mut [u32; LANES]>::try_from(&mut *at) {
                // All lanes: a fixed count, so the chains are fully unrolled.
                for _ in 0..depth {
                    for a in at.iter_mut() {
                        *a = self.next(*a, x);
                    }
                }
            } else {
                for _ in 0..depth {
                    for a in at.iter_mut() {
                        *a = self.next(*a, x);
                    }
                }
            }
            for &a in at.iter() {
                total += forest.nodes[a as usize].n;
            }
        }
        total
    }

    /// Adds each row's path length in every tree to its total.
    fn add_all(&self, forest: &FlatForest, block: &[f64], width: usize, totals: &mut [f64]) {
        for (&root, &depth) in forest.roots.iter().zip(&self.depths) {
            self.add_path_lengths(&forest.nodes, root, depth, block, width, totals);
        }
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
        for (rows, totals) in block.chunks(LANES * width).zip(totals.chunks_mut(LANES)) {
            let mut at = [root; LANES];
            if totals.len() == LANES {
                // A full block: a fixed count, so the rows' chains are fully unrolled.
                let xs: [&[f64]; LANES] =
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

impl FlatForest {
    /// Anomaly score `2^(-E[h(x)] / c)` in (0, 1]; higher is more anomalous.
    pub fn score(&self, x: &[f64]) -> f64 {
        let total = match &self.walk {
            Some(Lockstep::Axis(walk)) => walk.total(self, x),
            Some(Lockstep::Plane(walk)) => walk.total(self, x),
            None => self
                .roots
                .iter()
                .fold(0.0, |total, &root| total + self.path_length(root, x)),
        };
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
            match &self.walk {
                Some(Lockstep::Axis(walk)) => walk.add_all(self, block, width, totals),
                Some(Lockstep::Plane(walk)) => walk.add_all(self, block, width, totals),
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

/// How to grow a forest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForestOptions {
    pub trees: usize,
    pub sample_size: usize,
    /// 0: axis-parallel splits; `e`: hyperplanes over `e + 1` random columns.
    pub extension_level: usize,
    pub seed: u64,
}

/// Options for training; `samples` is capped at the number of rows, as scikit-learn does.
pub fn options(
    trees: usize,
    samples: usize,
    extension_level: usize,
    rows: usize,
    seed: u64,
) -> ForestOptions {
    ForestOptions {
        trees,
        sample_size: samples.min(rows),
        extension_level,
        seed,
    }
}

/// A trained tree as it was grown: the reference the flat form must reproduce.
#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    Leaf {
        size: usize,
        depth: usize,
    },
    Split {
        /// (column, normal coordinate, intercept) of each non-zero term; one for an axis split.
        terms: Vec<Term>,
        size: usize,
        left: Box<Tree>,
        right: Box<Tree>,
    },
}

impl Tree {
    /// Path length of `x`: the depth of its leaf plus the expected rest of the way, `c(size)`.
    pub fn path_length(&self, x: &[f64]) -> f64 {
        match self {
            Tree::Leaf { size, depth } => leaf_length(*size, *depth),
            Tree::Split {
                terms, left, right, ..
            } => {
                let side: f64 = terms.iter().map(|t| (x[t.dim as usize] - t.p) * t.n).sum();
                if side <= 0.0 {
                    left.path_length(x)
                } else {
                    right.path_length(x)
                }
            }
        }
    }
}

fn leaf_length(size: usize, depth: usize) -> f64 {
    let rest = if size <= 1 { 0.0 } else { c_factor(size) };
    rest + depth as f64
}

/// Grows one tree on the rows `idx` of `rows` (row-major, `width` columns).
fn grow(
    rows: &[f64],
    width: usize,
    idx: &mut [u32],
    depth: usize,
    limit: usize,
    extension: usize,
    rng: &mut ChaCha8Rng,
) -> Tree {
    let size = idx.len();
    let leaf = Tree::Leaf { size, depth };
    if size <= 1 || depth >= limit {
        return leaf;
    }
    let row = |i: u32| &rows[i as usize * width..(i as usize + 1) * width];
    // Columns that still vary among these rows: a split on a constant column isolates nothing.
    let ranges: Vec<(u32, f64, f64)> = (0..width)
        .filter_map(|d| {
            let (lo, hi) = idx
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
                    let v = row(i)[d];
                    (lo.min(v), hi.max(v))
                });
            (hi > lo).then_some((d as u32, lo, hi))
        })
        .collect();
    if ranges.is_empty() {
        return leaf;
    }
    let terms: Vec<Term> = if extension == 0 {
        let (dim, lo, hi) = ranges[rng.gen_range(0..ranges.len())];
        vec![Term {
            dim,
            n: 1.0,
            p: lo + rng.r#gen::<f64>() * (hi - lo),
        }]
    } else {
        let picks = sample(rng, ranges.len(), (extension + 1).min(ranges.len()));
        let mut terms: Vec<Term> = picks
            .iter()
            .map(|k| {
                let (dim, lo, hi) = ranges[k];
                // Slopes in units of each feature's range among these rows, so the split's
                // orientation does not depend on the units of the features (axis-parallel
                // splits never did): a feature spanning 0–4 counts as much as one spanning ±10.
                let n: f64 = StandardNormal.sample(rng);
                Term {
                    dim,
                    n: n / (hi - lo),
                    p: lo + rng.r#gen::<f64>() * (hi - lo),
                }
            })
            .collect();
        terms.sort_by_key(|t| t.dim);
        terms
    };
    let side = |i: u32| -> f64 {
        let x = row(i);
        terms.iter().map(|t| (x[t.dim as usize] - t.p) * t.n).sum()
    };
    // Partition in place: left (side <= 0) first.
    let mut split = 0;
    for j in 0..idx.len() {
        if side(idx[j]) <= 0.0 {
            idx.swap(j, split);
            split += 1;
        }
    }
    let (l, r) = idx.split_at_mut(split);
    let left = grow(rows, width, l, depth + 1, limit, extension, rng);
    let right = grow(rows, width, r, depth + 1, limit, extension, rng);
    Tree::Split {
        terms,
        size,
        left: Box::new(left),
        right: Box::new(right),
    }
}

/// Grows the trees: each from its own sample of `sample_size` rows drawn without replacement,
/// to a height limit of ceil(log2 sample_size), from a generator seeded by `opts.seed`.
pub fn grow_trees(rows: &[Vec<f64>], opts: &ForestOptions) -> Result<Vec<Tree>, ModelError> {
    let width = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || width == 0 || rows.iter().any(|r| r.len() != width) {
        return Err(ModelError::Inconsistent(
            "isolation forest rows are empty or of unequal width".into(),
        ));
    }
    if rows.iter().flatten().any(|v| !v.is_finite()) {
        return Err(ModelError::Training(
            "isolation forest rows hold a value that is not finite".into(),
        ));
    }
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let psi = opts.sample_size.clamp(1, rows.len());
    let limit = (psi as f64).log2().ceil().max(1.0) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    Ok((0..opts.trees)
        .map(|_| {
            let mut idx: Vec<u32> = sample(&mut rng, rows.len(), psi)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            idx.sort_unstable();
            grow(
                &flat,
                width,
                &mut idx,
                0,
                limit,
                opts.extension_level,
                &mut rng,
            )
        })
        .collect())
}

/// Trains a forest on `rows` and returns it flattened.
pub fn train(rows: &[Vec<f64>], opts: &ForestOptions) -> Result<FlatForest, ModelError> {
    let trees = grow_trees(rows, opts)?;
    let width = rows.first().map_or(0, Vec::len);
    Ok(FlatForest::from_trees(
        &trees,
        width,
        c_factor(opts.sample_size.clamp(2, rows.len().max(2))),
    ))
}

impl FlatForest {
    /// The flat form of `trees`: nodes in pre-order, the left child right after its parent.
    pub fn from_trees(trees: &[Tree], dims: usize, c: f64) -> Self {
        let mut flat = Self {
            dims,
            c,
            roots: Vec::with_capacity(trees.len()),
            nodes: Vec::new(),
            terms: Vec::new(),
            walk: None,
        };
        for tree in trees {
            flat.roots.push(flat.nodes.len() as u32);
            flat.push(tree);
        }
        flat.walk = Lockstep::build(&flat.roots, &flat.nodes, &flat.terms);
        flat
    }

    fn push(&mut self, tree: &Tree) {
        match tree {
            Tree::Leaf { size, depth } => self.nodes.push(Node {
                dim: 0,
                terms: 0,
                right: 0,
                n: leaf_length(*size, *depth),
                p: 0.0,
                size: *size as u32,
            }),
            Tree::Split {
                terms,
                size,
                left,
                right,
            } => {
                let at = self.nodes.len();
                let node = match terms.as_slice() {
                    [single] => Node {
                        dim: single.dim,
                        terms: 1,
                        right: 0,
                        n: single.n,
                        p: single.p,
                        size: *size as u32,
                    },
                    many => {
                        let start = self.terms.len() as u32;
                        self.terms.extend_from_slice(many);
                        Node {
                            dim: start,
                            terms: many.len() as u32,
                            right: 0,
                            n: 0.0,
                            p: 0.0,
                            size: *size as u32,
                        }
                    }
                };
                self.nodes.push(node);
                self.push(left);
                self.nodes[at].right = self.nodes.len() as u32;
                self.push(right);
            }
        }
    }

    /// How much each column's splits isolated `x`, averaged over the trees: at every split on
    /// its path, the bits by which `x`'s side is smaller than the node, `log2(size / child)`,
    /// beyond the one bit a balanced split gives every row. A column whose splits cut `x` off
    /// into small sides early is what made its path short; columns that only ever sent it with
    /// the bulk get nothing. Hyperplane splits share their credit by each term's part of the
    /// side. Negative totals (a column that kept `x` with the bulk) count as 0.
    pub fn attribution(&self, x: &[f64]) -> Vec<f64> {
        let mut credit = vec![0.0; self.dims];
        for &root in &self.roots {
            let mut i = root as usize;
            loop {
                let node = &self.nodes[i];
                if node.terms == 0 {
                    break;
                }
                let next = if self.side(node, x) <= 0.0 {
                    i + 1
                } else {
                    node.right as usize
                };
                let child = self.nodes[next].size.max(1);
                let bits = (f64::from(node.size.max(1)) / f64::from(child)).log2() - 1.0;
                match node.terms {
                    1 => credit[node.dim as usize] += bits,
                    k => {
                        let terms = &self.terms[node.dim as usize..(node.dim + k) as usize];
                        let parts: Vec<f64> = terms
                            .iter()
                            .map(|t| ((x[t.dim as usize] - t.p) * t.n).abs())
                            .collect();
                        let total: f64 = parts.iter().sum();
                        for (t, part) in terms.iter().zip(parts) {
                            let share = if total > 0.0 {
                                part / total
                            } else {
                                1.0 / f64::from(k)
                            };
                            credit[t.dim as usize] += bits * share;
                        }
                    }
                }
                i = next;
            }
        }
        let trees = self.roots.len().max(1) as f64;
        credit.iter().map(|c| (c / trees).max(0.0)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inliers(n: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| {
                vec![
                    rng.gen_range(-4.0..4.0),
                    rng.gen_range(-4.0..4.0),
                    rng.gen_range(10.0..50.0),
                ]
            })
            .collect()
    }

    #[test]
    fn flat_forest_scores_one_by_one_and_in_batches_equal_the_grown_trees_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let data = inliers(2000, &mut rng);
        for extension_level in [0, 2] {
            let opts = options(100, 256, extension_level, data.len(), 3);
            let trees = grow_trees(&data, &opts).unwrap_or_else(|e| panic!("{e}"));
            let flat = train(&data, &opts).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(flat.dims, 3);
            assert!(flat.walk.is_some());
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
                let total = trees.iter().fold(0.0, |t, tree| t + tree.path_length(x));
                let want = 2.0_f64
                    .powf(-(total / trees.len() as f64) / flat.c)
                    .to_bits();
                assert_eq!(flat.score(x).to_bits(), want, "{x:?}");
                assert_eq!(batch.to_bits(), want, "{x:?} in a batch");
            }
        }
    }

    #[test]
    fn the_same_seed_grows_the_same_forest_and_another_seed_another() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let data = inliers(500, &mut rng);
        let grow = |seed| train(&data, &options(50, 128, 0, data.len(), seed));
        let (a, b, c) = (grow(9), grow(9), grow(10));
        let json = |f: &Result<FlatForest, ModelError>| {
            f.as_ref()
                .map(serde_json::to_string)
                .ok()
                .and_then(Result::ok)
        };
        assert!(json(&a).is_some());
        assert_eq!(json(&a), json(&b));
        assert_ne!(json(&a), json(&c));
    }

    #[test]
    fn training_refuses_values_that_are_not_finite() {
        let rows = vec![vec![1.0, f64::NAN], vec![2.0, 3.0]];
        assert!(train(&rows, &options(5, 2, 0, 2, 1)).is_err());
    }

    #[test]
    fn hyperplane_scores_do_not_depend_on_the_units_of_a_feature() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let data = inliers(1000, &mut rng);
        // A power of two, so the rescaled arithmetic is exact and the scores must be equal bit
        // for bit: cents instead of hundreds of dollars, say.
        let rescale = |rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
            rows.iter()
                .map(|r| vec![r[0], r[1] * 1024.0, r[2]])
                .collect()
        };
        let probes = inliers(50, &mut rng);
        let opts = options(50, 256, 2, data.len(), 9);
        let plain = train(&data, &opts).unwrap_or_else(|e| panic!("{e}"));
        let scaled = train(&rescale(&data), &opts).unwrap_or_else(|e| panic!("{e}"));
        for (x, y) in probes.iter().zip(rescale(&probes)) {
            assert_eq!(plain.score(x).to_bits(), scaled.score(&y).to_bits());
        }
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
        for extension_level in [0, 3] {
            let forest = train(&rows, &options(100, 256, extension_level, rows.len(), 5))
                .unwrap_or_else(|e| panic!("{e}"));
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
            assert!(auc >= 0.95, "extension {extension_level}: ROC-AUC {auc}");
        }
    }

    #[test]
    fn attribution_credits_the_column_that_sets_a_row_apart() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let rows: Vec<Vec<f64>> = (0..2000)
            .map(|_| (0..5).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let forest =
            train(&rows, &options(100, 256, 0, rows.len(), 1)).unwrap_or_else(|e| panic!("{e}"));
        for column in 0..5 {
            let mut x = vec![0.1; 5];
            x[column] = 9.0;
            let credit = forest.attribution(&x);
            let best = (0..5).max_by(|&a, &b| credit[a].total_cmp(&credit[b]));
            assert_eq!(best, Some(column), "{credit:?}");
            let others: f64 = (0..5).filter(|&c| c != column).map(|c| credit[c]).sum();
            assert!(credit[column] > 2.0 * others, "{credit:?}");
        }
    }
}
