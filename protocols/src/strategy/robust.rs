//! Robust aggregation: how a coordinator that sees every site's update (plain mode only)
//! combines them so that a few poisoned updates cannot steer the model.
//!
//! The weighted mean (FedAvg) is what secure aggregation computes, and one site can move it
//! arbitrarily far. The rules here bound that: the coordinate-wise median and trimmed mean
//! (Yin et al., ICML 2018), Multi-Krum (Blanchard et al., NeurIPS 2017) and the norm-bounded
//! mean (Sun et al., 2019). They need the individual updates, which secure aggregation exists
//! to hide: with it on, only the norm bound can apply, at the honest sites themselves.
//!
//! Every rule returns a delta of the model's length that the server optimiser
//! ([`crate::strategy::Strategy`]) then applies as it would the mean, so they compose with
//! FedAdam and the rest.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `[aggregation]` in coordinator.toml.
///
/// The variants without settings are written `Mean {}`, not `Mean`: serde checks a struct
/// variant for unknown keys, a unit variant of a tagged enum silently ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    /// The example-weighted mean: FedAvg, and the only rule secure aggregation can compute.
    Mean {},
    /// Each coordinate's median over the sites (unweighted: a site's claimed example count
    /// is itself an input an attacker controls). Tolerates fewer than half the sites.
    Median {},
    /// Each coordinate's mean after dropping its `trim` fraction of largest and of smallest
    /// values (at least one of each when `trim` > 0), unweighted.
    TrimmedMean { trim: f64 },
    /// Multi-Krum: scores each update by the summed squared distances to its n − f − 2
    /// nearest others and averages the `keep` best (1: Krum itself; default n − f).
    /// Needs n > 2f + 2 sites.
    Krum {
        byzantine: usize,
        #[serde(default)]
        keep: Option<usize>,
    },
    /// The weighted mean of the updates, each first scaled down to at most `max_norm` in L2:
    /// bounds any one site's pull without discarding anyone.
    NormBounded { max_norm: f64 },
}

impl Default for Aggregation {
    fn default() -> Self {
        Aggregation::Mean {}
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AggregationError {
    #[error("aggregation.{key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: f64,
        allowed: &'static str,
    },
    #[error(
        "Krum with byzantine = {byzantine} needs more than {} updates; this round has {got}",
        2 * byzantine + 2
    )]
    TooFewForKrum { byzantine: usize, got: usize },
    #[error("no update to aggregate")]
    Empty,
    #[error("update {index} has {got} values, the first {expected}")]
    WrongLength {
        index: usize,
        got: usize,
        expected: usize,
    },
    #[error("the updates carry no weight")]
    NoWeight,
}

impl Aggregation {
    pub fn validate(&self) -> Result<(), AggregationError> {
        let invalid = |key, value, allowed| AggregationError::Invalid {
            key,
            value,
            allowed,
        };
        match *self {
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(invalid("trim", trim, "must be in [0, 0.5)"))
            }
            Aggregation::Krum { keep: Some(0), .. } => {
                Err(invalid("keep", 0.0, "must be at least 1"))
            }
            Aggregation::NormBounded { max_norm } if !(max_norm.is_finite() && max_norm > 0.0) => {
                Err(invalid("max_norm", max_norm, "must be a number above 0"))
            }
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Aggregation::Mean {} => "mean",
            Aggregation::Median {} => "median",
            Aggregation::TrimmedMean { .. } => "trimmed_mean",
            Aggregation::Krum { .. } => "krum",
            Aggregation::NormBounded { .. } => "norm_bounded",
        }
    }

    /// Whether the rule needs each site's update (everything but the mean).
    pub fn needs_updates(&self) -> bool {
        !matches!(self, Aggregation::Mean {})
    }

    /// The round's aggregated delta from `(weight, delta)` per site.
    pub fn aggregate(&self, updates: &[(f64, Vec<f32>)]) -> Result<Vec<f32>, AggregationError> {
        self.validate()?;
        let dim = updates.first().ok_or(AggregationError::Empty)?.1.len();
        if let Some((index, (_, u))) = updates.iter().enumerate().find(|(_, u)| u.1.len() != dim) {
            return Err(AggregationError::WrongLength {
                index,
                got: u.len(),
                expected: dim,
            });
        }
        match *self {
            Aggregation::Mean {} => weighted_mean(updates.iter().map(|(w, u)| (*w, u, 1.0)), dim),
            Aggregation::NormBounded { max_norm } => weighted_mean(
                updates.iter().map(|(w, u)| {
                    let norm = l2(u);
                    let scale = if norm > max_norm {
                        max_norm / norm
                    } else {
                        1.0
                    };
                    (*w, u, scale)
                }),
                dim,
            ),
            Aggregation::Median {} => Ok(by_coordinate(updates, dim, |column| {
                let n = column.len();
                if n % 2 == 1 {
                    column[n / 2]
                } else {
                    ((column[n / 2 - 1] as f64 + column[n / 2] as f64) / 2.0) as f32
                }
            })),
            Aggregation::TrimmedMean { trim } => {
                let n = updates.len();
                let mut cut = (trim * n as f64).floor() as usize;
                if trim > 0.0 {
                    cut = cut.max(1);
                }
                // Never trim everything: at least one value per coordinate remains.
                cut = cut.min((n - 1) / 2);
                Ok(by_coordinate(updates, dim, |column| {
                    let kept = &column[cut..column.len() - cut];
                    (kept.iter().map(|&v| v as f64).sum::<f64>() / kept.len() as f64) as f32
                }))
            }
            Aggregation::Krum { byzantine, keep } => {
                let n = updates.len();
                if n <= 2 * byzantine + 2 {
                    return Err(AggregationError::TooFewForKrum { byzantine, got: n });
                }
                let neighbours = n - byzantine - 2;
                let mut scores: Vec<(f64, usize)> = (0..n)
                    .map(|i| {
                        let mut d: Vec<f64> = (0..n)
                            .filter(|&j| j != i)
                            .map(|j| squared_distance(&updates[i].1, &updates[j].1))
                            .collect();
                        d.sort_by(f64::total_cmp);
                        (d[..neighbours].iter().sum(), i)
                    })
                    .collect();
                // Ties go to the lower index, so the choice is deterministic.
                scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let keep = keep.unwrap_or(n - byzantine).min(n);
                let chosen: Vec<&Vec<f32>> =
                    scores[..keep].iter().map(|(_, i)| &updates[*i].1).collect();
                // Unweighted, as in the paper: the weights are claims too.
                weighted_mean(chosen.into_iter().map(|u| (1.0, u, 1.0)), dim)
            }
        }
    }
}

fn l2(u: &[f32]) -> f64 {
    u.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum()
}

/// Σ w·s·u / Σ w over `(weight, update, scale)`, in f64.
fn weighted_mean<'a>(
    updates: impl Iterator<Item = (f64, &'a Vec<f32>, f64)>,
    dim: usize,
) -> Result<Vec<f32>, AggregationError> {
    let mut sum = vec![0.0f64; dim];
    let mut total = 0.0;
    for (w, u, scale) in updates {
        total += w;
        for (s, &v) in sum.iter_mut().zip(u.iter()) {
            *s += w * scale * v as f64;
        }
    }
    if total.is_nan() || total <= 0.0 {
        return Err(AggregationError::NoWeight);
    }
    Ok(sum.into_iter().map(|s| (s / total) as f32).collect())
}

/// `f` of each coordinate's values over the sites, sorted ascending.
fn by_coordinate(updates: &[(f64, Vec<f32>)], dim: usize, f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let mut column = Vec::with_capacity(updates.len());
    (0..dim)
        .map(|i| {
            column.clear();
            column.extend(updates.iter().map(|(_, u)| u[i]));
            column.sort_by(f32::total_cmp);
            f(&column)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Aggregation {
        toml::from_str(text).unwrap()
    }

    /// Four honest updates near (1, −1) and one attacker sending (−100, 100) with a huge
    /// claimed weight: the mean follows the attacker, every robust rule stays with the
    /// honest sites.
    #[test]
    fn robust_rules_resist_one_poisoned_update_that_moves_the_mean() {
        let honest = [(1.0, -1.0), (1.1, -0.9), (0.9, -1.1), (1.05, -0.95)];
        let mut updates: Vec<(f64, Vec<f32>)> =
            honest.iter().map(|&(a, b)| (10.0, vec![a, b])).collect();
        updates.push((1000.0, vec![-100.0, 100.0]));
        let mean = Aggregation::Mean {}.aggregate(&updates).unwrap();
        assert!(mean[0] < -90.0, "{mean:?}");
        for r in [
            "rule = \"median\"",
            "rule = \"trimmed_mean\"\ntrim = 0.2",
            "rule = \"krum\"\nbyzantine = 1",
            "rule = \"krum\"\nbyzantine = 1\nkeep = 1",
        ] {
            let got = rule(r).aggregate(&updates).unwrap();
            assert!(
                (got[0] - 1.0).abs() < 0.15 && (got[1] + 1.0).abs() < 0.15,
                "{r}: {got:?}"
            );
        }
        // The norm bound does not remove the attacker, it caps its pull: with a bound of 2
        // and the weights claimed, the result stays within 2 of the origin.
        let bounded = rule("rule = \"norm_bounded\"\nmax_norm = 2.0")
            .aggregate(&updates)
            .unwrap();
        assert!(l2(&bounded) <= 2.0 + 1e-6, "{bounded:?}");
    }

    /// Exact values: the median of an even count is the midpoint, the trimmed mean drops
    /// one of each end, the mean is weighted, Krum keeps the closest.
    #[test]
    fn each_rule_computes_its_statistic_exactly() {
        let updates: Vec<(f64, Vec<f32>)> = vec![
            (1.0, vec![1.0, 10.0]),
            (3.0, vec![2.0, 20.0]),
            (1.0, vec![3.0, 30.0]),
            (1.0, vec![10.0, 100.0]),
        ];
        assert_eq!(
            Aggregation::Mean {}.aggregate(&updates).unwrap(),
            vec![
                (1.0 + 6.0 + 3.0 + 10.0) / 6.0,
                (10.0 + 60.0 + 30.0 + 100.0) / 6.0
            ]
        );
        assert_eq!(
            Aggregation::Median {}.aggregate(&updates).unwrap(),
            vec![2.5, 25.0]
        );
        assert_eq!(
            rule("rule = \"trimmed_mean\"\ntrim = 0.1")
                .aggregate(&updates)
                .unwrap(),
            vec![2.5, 25.0]
        );
        // n = 4, f = 0: two nearest others. The outlier (10, 100) scores worst and is left
        // out of the best three.
        assert_eq!(
            rule("rule = \"krum\"\nbyzantine = 0\nkeep = 3")
                .aggregate(&updates)
                .unwrap(),
            vec![2.0, 20.0]
        );
        assert_eq!(
            rule("rule = \"norm_bounded\"\nmax_norm = 1e9")
                .aggregate(&updates)
                .unwrap(),
            Aggregation::Mean {}.aggregate(&updates).unwrap()
        );
    }

    #[test]
    fn bad_settings_and_inputs_are_refused_by_name() {
        assert_eq!(
            rule("rule = \"trimmed_mean\"\ntrim = 0.5")
                .validate()
                .unwrap_err()
                .to_string(),
            "aggregation.trim = 0.5: must be in [0, 0.5)"
        );
        assert!(
            rule("rule = \"norm_bounded\"\nmax_norm = -1")
                .validate()
                .is_err()
        );
        assert!(toml::from_str::<Aggregation>("rule = \"bulyan\"").is_err());
        assert_eq!(
            toml::from_str::<Aggregation>("rule = \"mean\"").unwrap(),
            Aggregation::default()
        );
        assert!(toml::from_str::<Aggregation>("rule = \"median\"\ntrim = 0.1").is_err());
        let three: Vec<(f64, Vec<f32>)> = (0..3).map(|i| (1.0, vec![i as f32])).collect();
        assert_eq!(
            rule("rule = \"krum\"\nbyzantine = 1")
                .aggregate(&three)
                .unwrap_err(),
            AggregationError::TooFewForKrum {
                byzantine: 1,
                got: 3
            }
        );
        assert_eq!(
            Aggregation::Median {}
                .aggregate(&[(1.0, vec![1.0]), (1.0, vec![1.0, 2.0])])
                .unwrap_err(),
            AggregationError::WrongLength {
                index: 1,
                got: 2,
                expected: 1
            }
        );
        assert_eq!(
            Aggregation::Mean {}.aggregate(&[]).unwrap_err(),
            AggregationError::Empty
        );
    }
}
