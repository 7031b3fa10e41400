//! Turning [`Features`] into a model's input row: which features, how categoricals are encoded
//! (ordinal for the forest, one-hot for LOF) and whether numerics are robust-scaled (LOF only),
//! all learned from the training rows as scikit-learn's encoders and `RobustScaler` would.

use serde::{Deserialize, Serialize};

use super::ModelError;
use crate::features::{Features, categorical_index, numeric_index};

/// How categorical features enter the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CategoricalEncoding {
    /// One column per feature: the value's index in the sorted vocabulary (-1 if unseen).
    Ordinal,
    /// One column per vocabulary entry, 1 for the value (all 0 if unseen).
    OneHot,
}

/// A categorical feature and the values seen in training, sorted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    pub feature: String,
    #[serde(skip)]
    index: usize,
    pub values: Vec<String>,
}

/// `(x - center) / scale` per numeric column; scale is the interquartile range (1 where it is 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustScaler {
    pub center: Vec<f64>,
    pub scale: Vec<f64>,
}

/// A fitted encoder from features to one model's input row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoder {
    pub numeric: Vec<String>,
    #[serde(skip)]
    numeric_index: Vec<usize>,
    pub categorical: Vec<Vocabulary>,
    pub encoding: CategoricalEncoding,
    pub scaler: Option<RobustScaler>,
    /// Column names of the produced row.
    pub columns: Vec<String>,
}

/// Linear-interpolated percentile of sorted data, computed as numpy's default method does
/// (including its two-sided lerp), so thresholds match scikit-learn's to the bit.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = (sorted.len() - 1) as f64 * (q / 100.0);
    let lo = (pos.floor() as usize).min(sorted.len() - 1);
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = pos - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// Percentile of unsorted data (numpy's `percentile`, linear interpolation).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, q)
}

impl Encoder {
    /// Learns vocabularies (and the scaler, when `scale`) from training features.
    pub fn fit(
        numeric: &[String],
        categorical: &[String],
        encoding: CategoricalEncoding,
        scale: bool,
        rows: &[Features],
    ) -> Result<Self, ModelError> {
        let vocabularies = categorical
            .iter()
            .map(|name| {
                let index = categorical_index(name)
                    .ok_or_else(|| ModelError::UnknownFeature(name.clone()))?;
                let mut values: Vec<String> = rows
                    .iter()
                    .map(|r| r.categorical[index].to_string())
                    .collect();
                values.sort();
                values.dedup();
                Ok(Vocabulary {
                    feature: name.clone(),
                    index,
                    values,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut enc = Self {
            numeric: numeric.to_vec(),
            numeric_index: Vec::new(),
            categorical: vocabularies,
            encoding,
            scaler: None,
            columns: Vec::new(),
        };
        enc.resolve()?;
        if scale {
            let (mut center, mut iqr) = (Vec::new(), Vec::new());
            for &i in &enc.numeric_index {
                let mut col: Vec<f64> = rows.iter().map(|r| r.numeric[i]).collect();
                col.sort_by(f64::total_cmp);
                center.push(percentile_sorted(&col, 50.0));
                let range = percentile_sorted(&col, 75.0) - percentile_sorted(&col, 25.0);
                iqr.push(if range == 0.0 { 1.0 } else { range });
            }
            enc.scaler = Some(RobustScaler { center, scale: iqr });
        }
        Ok(enc)
    }

    /// Rebuilds the lookup indexes and column names after deserialisation.
    pub fn resolve(&mut self) -> Result<(), ModelError> {
        self.numeric_index = self
            .numeric
            .iter()
            .map(|n| numeric_index(n).ok_or_else(|| ModelError::UnknownFeature(n.clone())))
            .collect::<Result<_, _>>()?;
        for v in &mut self.categorical {
            v.index = categorical_index(&v.feature)
                .ok_or_else(|| ModelError::UnknownFeature(v.feature.clone()))?;
        }
        let mut columns = self.numeric.clone();
        for v in &self.categorical {
            match self.encoding {
                CategoricalEncoding::Ordinal => columns.push(v.feature.clone()),
                CategoricalEncoding::OneHot => {
                    columns.extend(v.values.iter().map(|x| format!("{}={x}", v.feature)))
                }
            }
        }
        self.columns = columns;
        if let Some(s) = &self.scaler
            && (s.center.len() != self.numeric.len() || s.scale.len() != self.numeric.len())
        {
            return Err(ModelError::Inconsistent(
                "scaler width differs from the numeric feature list".into(),
            ));
        }
        Ok(())
    }

    /// Width of the produced row.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Indexes (into `Features::numeric`) of the numeric columns, in row order.
    pub fn numeric_indexes(&self) -> &[usize] {
        &self.numeric_index
    }

    /// Writes the row for `f` into `out` (cleared first).
    pub fn encode_into(&self, f: &Features, out: &mut Vec<f64>) {
        out.clear();
        match &self.scaler {
            Some(s) => out.extend(
                self.numeric_index
                    .iter()
                    .zip(s.center.iter().zip(&s.scale))
                    .map(|(&i, (c, sc))| (f.numeric[i] - c) / sc),
            ),
            None => out.extend(self.numeric_index.iter().map(|&i| f.numeric[i])),
        }
        for v in &self.categorical {
            let value = f.categorical[v.index];
            let pos = v.values.iter().position(|x| x == value);
            match self.encoding {
                CategoricalEncoding::Ordinal => out.push(pos.map_or(-1.0, |p| p as f64)),
                CategoricalEncoding::OneHot => {
                    out.extend((0..v.values.len()).map(|j| f64::from(u8::from(pos == Some(j)))))
                }
            }
        }
    }

    /// The row for `f` as a new vector.
    pub fn encode(&self, f: &Features) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.width());
        self.encode_into(f, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::NUMERIC_FEATURES;

    fn row(amount: f64, channel: &'static str) -> Features {
        let mut numeric = [0.0; NUMERIC_FEATURES.len()];
        numeric[0] = amount;
        Features {
            numeric,
            categorical: ["Debit", channel, "Doctor"],
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 25.0), 1.75);
        // numpy.percentile([1, 2, 3, 4], 95) == 3.8499999999999996
        assert_eq!(percentile(&v, 95.0), 3.8499999999999996);
        assert_eq!(percentile(&v, 100.0), 4.0);
    }

    #[test]
    fn lof_rows_are_robust_scaled_with_one_hot_categoricals() {
        let rows = [
            row(1.0, "ATM"),
            row(2.0, "Online"),
            row(3.0, "ATM"),
            row(4.0, "Branch"),
        ];
        let enc = Encoder::fit(
            &["TransactionAmount".into()],
            &["Channel".into()],
            CategoricalEncoding::OneHot,
            true,
            &rows,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            enc.columns,
            [
                "TransactionAmount",
                "Channel=ATM",
                "Channel=Branch",
                "Channel=Online"
            ]
        );
        // median 2.5, IQR 3.25 - 1.75 = 1.5
        assert_eq!(enc.encode(&row(4.0, "Online")), [1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn forest_rows_are_raw_with_ordinal_categoricals() {
        let rows = [row(1.0, "ATM"), row(2.0, "Online")];
        let enc = Encoder::fit(
            &["TransactionAmount".into()],
            &["Channel".into()],
            CategoricalEncoding::Ordinal,
            false,
            &rows,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(enc.encode(&row(7.0, "Online")), [7.0, 1.0]);
        assert_eq!(enc.encode(&row(7.0, "Branch")), [7.0, -1.0]);
    }
}
