//! Quantisation of a weighted model delta into a vector of ring elements, and back.
//!
//! A site with `w` examples and delta `Δ` sends `[min(w, W), clipped, z_1 .. z_d]` where
//! `z_i` is `w' · clip(Δ_i)` (with `w' = min(w, W) / W ∈ [0, 1]`) mapped from `[-c, c]` onto
//! `[0, 2^q - 1]` with stochastic rounding. Summing these vectors over the survivors gives
//! Σw, the total number of clipped values and Σ w'Δ up to rounding — hence the weighted mean —
//! without the server learning any site's weight, delta or clipping count.
//!
//! Why stochastic rounding: it is unbiased, so rounding errors average out over sites instead
//! of accumulating in one direction. Why the clipped count rides inside the masked vector:
//! clipping must never be silent, and a per-site count sent in the clear would leak how unusual
//! that site's update is.

use rand_core::Rng;
use thiserror::Error;

use super::params::Params;
use super::word::Word;

/// Index of the weight in the vector.
pub const WEIGHT_INDEX: usize = 0;
/// Index of the clipped-value counter.
pub const CLIPPED_INDEX: usize = 1;
/// Index of the first quantised delta value.
pub const VALUES_OFFSET: usize = 2;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("delta has {got} values, the round's model has {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("delta value {index} is {value}, not a finite number")]
    NotFinite { index: usize, value: f32 },
    #[error("aggregate vector has {got} elements, expected {expected}")]
    WrongAggregateLength { got: usize, expected: usize },
    #[error("the total weight of the survivors is 0: no site reported any examples")]
    ZeroWeight,
    #[error("no survivors: nothing to dequantise")]
    NoSurvivors,
    #[error(
        "the survivors' total weight {total} exceeds survivors x max_weight = {max}: a site sent a weight above the cap, or the sum is not a sum of valid inputs"
    )]
    WeightOutOfRange { total: u64, max: u64 },
    #[error(
        "the clipped-value count {clipped} exceeds survivors x dim = {max}: the sum is not a sum of valid inputs"
    )]
    ClippedOutOfRange { clipped: u64, max: u64 },
    #[error(
        "summed value {index} is {value}, above survivors x (2^quant_bits - 1) = {max}: a site sent an element outside the quantisation range"
    )]
    ValueOutOfRange { index: usize, value: u64, max: u64 },
}

/// A site's quantised input, ready to be masked. Zeroised on drop: it is the site's update.
#[derive(Clone, PartialEq, Eq)]
pub struct QuantisedInput<W: Word> {
    pub(crate) values: Vec<W>,
}

impl<W: Word> std::fmt::Debug for QuantisedInput<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantisedInput({} values)", self.values.len())
    }
}

impl<W: Word> Drop for QuantisedInput<W> {
    fn drop(&mut self) {
        for v in self.values.iter_mut() {
            *v = W::ZERO;
        }
    }
}

impl<W: Word> QuantisedInput<W> {
    /// Wraps raw elements (the benchmark and tests build inputs directly). The length is checked
    /// when the input is masked.
    pub fn from_values(values: Vec<W>) -> Self {
        QuantisedInput { values }
    }

    pub fn values(&self) -> &[W] {
        &self.values
    }
}

/// What quantisation did to one site's update. Stays at the site; the server only learns the
/// sum of `clipped` over survivors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClipReport {
    /// Delta values outside `[-c, c]` that were clipped.
    pub clipped: u32,
    /// Whether the example count was above `max_weight` and capped.
    pub weight_capped: bool,
}

fn scale(params: &Params) -> f64 {
    ((1u64 << params.quant_bits) - 1) as f64 / (2.0 * params.clip as f64)
}

/// Quantises `delta` (length `params.dim`) with example count `weight`.
pub fn quantise<W: Word, R: Rng + ?Sized>(
    params: &Params,
    delta: &[f32],
    weight: u64,
    rng: &mut R,
) -> Result<(QuantisedInput<W>, ClipReport), QuantError> {
    if delta.len() != params.dim as usize {
        return Err(QuantError::WrongLength {
            got: delta.len(),
            expected: params.dim as usize,
        });
    }
    if let Some((index, &value)) = delta.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NotFinite { index, value });
    }
    let capped = weight.min(params.max_weight);
    let w_frac = capped as f64 / params.max_weight as f64;
    let c = params.clip as f64;
    let s = scale(params);
    let top = ((1u64 << params.quant_bits) - 1) as f64;
    let mut values = Vec::with_capacity(params.vector_len());
    values.push(W::from_u64_wrapping(capped));
    values.push(W::ZERO);
    let mut clipped = 0u32;
    for &d in delta {
        let d = d as f64;
        let clamped = d.clamp(-c, c);
        if clamped != d {
            clipped += 1;
        }
        let r = ((w_frac * clamped + c) * s).clamp(0.0, top);
        let floor = r.floor();
        // Round up with probability equal to the fractional part: E[z] = r.
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let z = if u < r - floor { floor + 1.0 } else { floor };
        values.push(W::from_u64_wrapping(z.min(top) as u64));
    }
    values[CLIPPED_INDEX] = W::from_u64_wrapping(clipped as u64);
    Ok((
        QuantisedInput { values },
        ClipReport {
            clipped,
            weight_capped: weight > params.max_weight,
        },
    ))
}

/// The server's view of a round's result after dequantisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Σ min(w, W) over survivors.
    pub total_weight: u64,
    /// Total clipped values over survivors.
    pub clipped: u64,
    pub survivors: usize,
    /// Σ w Δ / Σ w with capped weights: the FedAvg update.
    pub mean: Vec<f32>,
    /// Bound on |mean - exact weighted mean of the clipped deltas|, per element.
    pub error_bound: f64,
}

/// Turns the unmasked sum of `survivors` quantised vectors into the weighted mean delta.
pub fn dequantise<W: Word>(
    params: &Params,
    sum: &[W],
    survivors: usize,
) -> Result<Aggregate, QuantError> {
    let d = Dequantiser::new(params, sum.len(), sum.get(WEIGHT_INDEX).copied(), survivors)?;
    for (i, z) in sum.iter().enumerate() {
        d.check(i, *z, params.dim)?;
    }
    Ok(Aggregate {
        total_weight: d.total_weight,
        clipped: sum[CLIPPED_INDEX].to_u64(),
        survivors,
        mean: sum[VALUES_OFFSET..].iter().map(|z| d.mean(*z)).collect(),
        error_bound: error_bound(params, survivors, d.total_weight),
    })
}

/// [`dequantise`] one element at a time, for sums too large to turn into a second vector:
/// the coordinator applies each range of the mean to the model as it is computed.
#[derive(Debug, Clone, Copy)]
pub struct Dequantiser {
    pub total_weight: u64,
    survivors: u64,
    /// The largest value a sum of `survivors` valid inputs can hold.
    max_value: u64,
    scale: f64,
    offset: f64,
    w_frac_sum: f64,
}

impl Dequantiser {
    /// `len` is the sum's length and `weight` its element [`WEIGHT_INDEX`] (Σw).
    ///
    /// Σw is checked against survivors × max_weight: every valid input caps its own weight,
    /// so a larger total means a site (or the unmasking) produced something no honest input
    /// can, and the update is refused before it moves the model.
    pub fn new<W: Word>(
        params: &Params,
        len: usize,
        weight: Option<W>,
        survivors: usize,
    ) -> Result<Self, QuantError> {
        if len != params.vector_len() {
            return Err(QuantError::WrongAggregateLength {
                got: len,
                expected: params.vector_len(),
            });
        }
        if survivors == 0 {
            return Err(QuantError::NoSurvivors);
        }
        let total_weight = weight.map_or(0, W::to_u64);
        if total_weight == 0 {
            return Err(QuantError::ZeroWeight);
        }
        let max = (survivors as u64).saturating_mul(params.max_weight);
        if total_weight > max {
            return Err(QuantError::WeightOutOfRange {
                total: total_weight,
                max,
            });
        }
        let top = (1u64 << params.quant_bits) - 1;
        Ok(Dequantiser {
            total_weight,
            survivors: survivors as u64,
            max_value: (survivors as u64).saturating_mul(top),
            scale: scale(params),
            offset: survivors as f64 * params.clip as f64,
            // Σ w' = Σ w / W
            w_frac_sum: total_weight as f64 / params.max_weight as f64,
        })
    }

    /// Checks a summed element `z` at `index` of the sum: from [`VALUES_OFFSET`] on each is a
    /// sum of `survivors` values in [0, 2^q - 1], and the clipped count is at most one per
    /// value and survivor. Run over the whole sum before any of it is applied.
    pub fn check<W: Word>(&self, index: usize, z: W, dim: u32) -> Result<(), QuantError> {
        let value = z.to_u64();
        match index {
            WEIGHT_INDEX => Ok(()),
            CLIPPED_INDEX => {
                let max = self.survivors.saturating_mul(dim as u64);
                if value > max {
                    Err(QuantError::ClippedOutOfRange {
                        clipped: value,
                        max,
                    })
                } else {
                    Ok(())
                }
            }
            _ if value > self.max_value => Err(QuantError::ValueOutOfRange {
                index,
                value,
                max: self.max_value,
            }),
            _ => Ok(()),
        }
    }

    /// The weighted mean of one summed element (one of the sum's values, from
    /// [`VALUES_OFFSET`] on).
    pub fn mean<W: Word>(&self, z: W) -> f32 {
        ((z.to_u64() as f64 / self.scale - self.offset) / self.w_frac_sum) as f32
    }
}

/// Each site's rounding error is below one quantisation step 1/s in units of w'Δ, so the sum's
/// error is below m/s and the mean's below m / (s Σw'). The f32 output adds its own rounding.
pub fn error_bound(params: &Params, survivors: usize, total_weight: u64) -> f64 {
    let w_frac_sum = total_weight as f64 / params.max_weight as f64;
    survivors as f64 / (scale(params) * w_frac_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use proptest::prelude::*;
    use rand_core::SeedableRng;

    fn params(dim: u32, q: u32, clip: f32) -> Params {
        Params {
            quant_bits: q,
            clip,
            max_weight: 500,
            ..Params::with_defaults(16, dim)
        }
    }

    proptest! {
        #[test]
        fn dequantised_mean_is_within_the_bound(
            sites in proptest::collection::vec(
                (1u64..800, proptest::collection::vec(-0.5f32..0.5, 8)), 1..16),
            q in 8u32..24,
            seed in any::<u64>(),
        ) {
            let p = params(8, q, 0.5);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum = vec![0u32; p.vector_len()];
            for (w, delta) in &sites {
                let (x, report) = quantise::<u32, _>(&p, delta, *w, &mut rng).unwrap();
                prop_assert_eq!(report.clipped, 0);
                prop_assert_eq!(report.weight_capped, *w > 500);
                crate::secagg::word::add_assign(&mut sum, x.values());
            }
            let agg = dequantise(&p, &sum, sites.len()).unwrap();
            let total: u64 = sites.iter().map(|(w, _)| (*w).min(500)).sum();
            prop_assert_eq!(agg.total_weight, total);
            prop_assert_eq!(agg.clipped, 0);
            for i in 0..8 {
                let exact: f64 = sites.iter().map(|(w, d)| (*w).min(500) as f64 * d[i] as f64).sum::<f64>()
                    / total as f64;
                let err = (agg.mean[i] as f64 - exact).abs();
                // + f32 rounding of the output
                prop_assert!(err <= agg.error_bound + 1e-6 * exact.abs().max(1.0),
                    "element {}: error {} > bound {}", i, err, agg.error_bound);
            }
        }
    }

    #[test]
    fn clipping_is_counted_and_summed() {
        let p = params(5, 16, 1.0);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (a, ra) = quantise::<u64, _>(&p, &[0.0, 2.0, -3.0, 0.5, 1.0], 10, &mut rng).unwrap();
        let (b, rb) = quantise::<u64, _>(&p, &[1.5, 0.0, 0.0, 0.0, 0.0], 10_000, &mut rng).unwrap();
        assert_eq!(
            ra,
            ClipReport {
                clipped: 2,
                weight_capped: false
            }
        );
        assert_eq!(
            rb,
            ClipReport {
                clipped: 1,
                weight_capped: true
            }
        );
        let mut sum = vec![0u64; p.vector_len()];
        crate::secagg::word::add_assign(&mut sum, a.values());
        crate::secagg::word::add_assign(&mut sum, b.values());
        let agg = dequantise(&p, &sum, 2).unwrap();
        assert_eq!(agg.clipped, 3);
        assert_eq!(agg.total_weight, 510);
        // element 1: site a contributes clip(2.0) = 1.0 with weight 10
        let expected = 10.0 * 1.0 / 510.0;
        assert!((agg.mean[1] as f64 - expected).abs() <= agg.error_bound + 1e-7);
    }

    #[test]
    fn extremes_map_to_the_ends_of_the_range() {
        let p = params(2, 8, 1.0);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (x, _) = quantise::<u32, _>(&p, &[-1.0, 1.0], 500, &mut rng).unwrap();
        assert_eq!(x.values(), &[500, 0, 0, 255]);
    }

    #[test]
    fn rejects_bad_input() {
        let p = params(3, 16, 1.0);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            quantise::<u32, _>(&p, &[0.0, 1.0], 1, &mut rng).unwrap_err(),
            QuantError::WrongLength {
                got: 2,
                expected: 3
            }
        );
        let err = quantise::<u32, _>(&p, &[0.0, f32::NAN, 0.0], 1, &mut rng).unwrap_err();
        assert!(matches!(err, QuantError::NotFinite { index: 1, .. }));
        assert_eq!(
            dequantise::<u32>(&p, &[0; 5], 1).unwrap_err(),
            QuantError::ZeroWeight
        );
        assert_eq!(
            dequantise::<u32>(&p, &[1; 5], 0).unwrap_err(),
            QuantError::NoSurvivors
        );
        assert!(matches!(
            dequantise::<u32>(&p, &[1; 4], 1),
            Err(QuantError::WrongAggregateLength { .. })
        ));
    }

    #[test]
    fn a_sum_no_valid_inputs_can_make_is_refused() {
        // max_weight 500, q = 16, dim 3: two survivors' valid sums stay within 1000 weight,
        // 6 clipped values and 2 x 65535 per value.
        let p = params(3, 16, 1.0);
        let ok = [1000u64, 6, 131_070, 0, 65_535];
        assert!(dequantise::<u64>(&p, &ok, 2).is_ok());
        let mut heavy = ok;
        heavy[WEIGHT_INDEX] = 1001;
        assert_eq!(
            dequantise::<u64>(&p, &heavy, 2).unwrap_err(),
            QuantError::WeightOutOfRange {
                total: 1001,
                max: 1000
            }
        );
        let mut clipped = ok;
        clipped[CLIPPED_INDEX] = 7;
        assert!(matches!(
            dequantise::<u64>(&p, &clipped, 2),
            Err(QuantError::ClippedOutOfRange { clipped: 7, max: 6 })
        ));
        let mut big = ok;
        big[4] = 131_071;
        assert_eq!(
            dequantise::<u64>(&p, &big, 2).unwrap_err(),
            QuantError::ValueOutOfRange {
                index: 4,
                value: 131_071,
                max: 131_070
            }
        );
    }
}
