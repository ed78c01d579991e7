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

use super::params::{NOISE_TAIL, Noise, Params};
use super::word::Word;
use crate::privacy::discrete_gaussian;

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
    #[error(
        "summed value {index} lies {offset:.0} quantisation steps from the centre of the range, more than the {max:.0} that values plus {NOISE_TAIL} standard deviations of the survivors' noise can reach: a site sent an element outside the quantisation range"
    )]
    NoisyValueOutOfRange { index: usize, offset: f64, max: f64 },
    #[error(
        "the unmasked sum has L2 norm {norm:.6}, beyond the {max:.6} that inputs within norm_bound can reach: a site sent an update beyond the bound"
    )]
    NormOutOfRange { norm: f64, max: f64 },
    #[error(
        "{survivors} survivor(s), fewer than the {min} the noise was sized for: the sum carries less noise than the privacy guarantee assumes"
    )]
    TooFewForNoise { survivors: usize, min: u32 },
    #[error(
        "with noise every site's weight element is 1, but the survivors' weights sum to {total} for {survivors} survivor(s)"
    )]
    NoisyWeight { total: u64, survivors: usize },
    #[error("with noise no site sends a clipped count, but the survivors' counts sum to {clipped}")]
    NoisyClipped { clipped: u64 },
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
    /// Whether the update was scaled down to [`Params::norm_bound`].
    pub norm_scaled: bool,
}

/// `r` rounded up with probability equal to its fractional part (E = r), capped at `top`.
fn round_stochastic<R: Rng + ?Sized>(r: f64, top: f64, rng: &mut R) -> f64 {
    let floor = r.floor();
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let z = if u < r - floor { floor + 1.0 } else { floor };
    z.min(top)
}

/// The factor that scales `delta` to L2 norm at most `bound` (1 within it).
fn l2_factor(delta: &[f32], bound: Option<f64>) -> f64 {
    let Some(bound) = bound else {
        return 1.0;
    };
    let norm = delta
        .iter()
        .map(|&d| f64::from(d) * f64::from(d))
        .sum::<f64>()
        .sqrt();
    if norm > bound { bound / norm } else { 1.0 }
}

fn scale(params: &Params) -> f64 {
    ((1u64 << params.quant_bits) - 1) as f64 / (2.0 * params.clip as f64)
}

/// Quantises `delta` (length `params.dim`) with example count `weight`; with
/// [`Params::noise`], [`quantise_noisy`] instead (the weight is then not used).
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
    if let Some(noise) = params.noise {
        return Ok(quantise_l2(params, delta, noise.sigma, rng));
    }
    let capped = weight.min(params.max_weight);
    let w_frac = capped as f64 / params.max_weight as f64;
    let c = params.clip as f64;
    // The norm bound first (the whole update scaled), then the per-value clip.
    let factor = l2_factor(delta, params.norm_bound.map(f64::from));
    let s = scale(params);
    let top = ((1u64 << params.quant_bits) - 1) as f64;
    let mut values = Vec::with_capacity(params.vector_len());
    values.push(W::from_u64_wrapping(capped));
    values.push(W::ZERO);
    let mut clipped = 0u32;
    for &d in delta {
        let d = d as f64 * factor;
        let clamped = d.clamp(-c, c);
        if clamped != d {
            clipped += 1;
        }
        let r = ((w_frac * clamped + c) * s).clamp(0.0, top);
        values.push(W::from_u64_wrapping(round_stochastic(r, top, rng) as u64));
    }
    values[CLIPPED_INDEX] = W::from_u64_wrapping(clipped as u64);
    Ok((
        QuantisedInput { values },
        ClipReport {
            clipped,
            weight_capped: weight > params.max_weight,
            norm_scaled: factor < 1.0,
        },
    ))
}

/// Site-level DP: `delta` scaled to L2 norm at most `clip`, quantised (stochastic rounding),
/// then N_Z(0, σ²) added to every value (none when `sigma` is 0), wrapping in the ring. The
/// weight element is 1 and the clipped counter 0 (see [`Noise`]); [`ClipReport::clipped`] is 1
/// when the norm was scaled down, for the site's own log.
///
/// The noise is drawn from `rng`, the same generator as the rounding: seeded per round and
/// model, a redo of the round sends the same noisy input, so the coordinator gets no second
/// noisy look at the same update.
fn quantise_l2<W: Word, R: Rng + ?Sized>(
    params: &Params,
    delta: &[f32],
    sigma: f64,
    rng: &mut R,
) -> (QuantisedInput<W>, ClipReport) {
    let c = params.clip as f64;
    let factor = l2_factor(delta, Some(c));
    let s = scale(params);
    let top = ((1u64 << params.quant_bits) - 1) as f64;
    let mut values = Vec::with_capacity(params.vector_len());
    values.push(W::from_u64_wrapping(1));
    values.push(W::ZERO);
    for &d in delta {
        // |d · factor| ≤ c, so r is in [0, top] up to float rounding, which the clamp removes.
        let r = ((f64::from(d) * factor + c) * s).clamp(0.0, top);
        let z = round_stochastic(r, top, rng);
        let noise = if sigma > 0.0 {
            discrete_gaussian(sigma, rng)
        } else {
            0
        };
        let noisy = (z as i64).wrapping_add(noise);
        // Two's complement: a negative value wraps to 2^b − |v|, which is what the ring needs.
        values.push(W::from_u64_wrapping(noisy as u64));
    }
    (
        QuantisedInput { values },
        ClipReport {
            clipped: u32::from(factor < 1.0),
            weight_capped: false,
            norm_scaled: factor < 1.0,
        },
    )
}

/// Central DP (plain mode, a coordinator trusted with the updates): what every site does under
/// site-level DP, done once by the coordinator for all of them. Each update is scaled to L2
/// norm `params.clip` and quantised, the quantised updates are summed, and one N_Z(0, σ²) is
/// added to every value of the sum, with σ = `noise_multiplier` × [`Params::l2_sensitivity`].
/// The result is read exactly as a secure round's noisy sum, so a plain and a secure round
/// with the same total noise release the same distribution and are priced alike; and the
/// noise is drawn on the integer grid, never as a float Gaussian, whose low-order bits give
/// the value away (Mironov, CCS 2012).
///
/// Returns the aggregate (`mean` is the unweighted mean of the clipped updates plus noise)
/// and how many updates were scaled down. `params.noise` is ignored.
pub fn central_release<R: Rng + ?Sized>(
    params: &Params,
    updates: &[&[f32]],
    noise_multiplier: f64,
    rng: &mut R,
) -> Result<(Aggregate, usize), QuantError> {
    if updates.is_empty() {
        return Err(QuantError::NoSurvivors);
    }
    let n = updates.len();
    let sigma = noise_multiplier * params.l2_sensitivity();
    // Read back as n survivors whose noise shares sum to N_Z(0, σ²).
    let p = Params {
        noise: Some(Noise {
            sigma: sigma / (n as f64).sqrt(),
            min_survivors: 1,
        }),
        ..params.clone()
    };
    if let Some(e) = delta_len_mismatch(params, updates) {
        return Err(e);
    }
    let mut sum = vec![0u64; p.vector_len()];
    let mut scaled = 0;
    for u in updates {
        if let Some((index, &value)) = u.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(QuantError::NotFinite { index, value });
        }
        let (x, report) = quantise_l2::<u64, _>(&p, u, 0.0, rng);
        scaled += report.clipped as usize;
        crate::secagg::word::add_assign(&mut sum, x.values());
    }
    for v in sum.iter_mut().skip(VALUES_OFFSET) {
        *v = v.wrapping_add(discrete_gaussian(sigma, rng) as u64);
    }
    Ok((dequantise(&p, &sum, n)?, scaled))
}

fn delta_len_mismatch(params: &Params, updates: &[&[f32]]) -> Option<QuantError> {
    updates
        .iter()
        .find(|u| u.len() != params.dim as usize)
        .map(|u| QuantError::WrongLength {
            got: u.len(),
            expected: params.dim as usize,
        })
}

/// Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021): the clip moves
/// geometrically toward the `target_quantile` of the updates' norms, from the noisy count of
/// updates that were *not* clipped. With a target of 0.5 the clip follows the median norm, so
/// the noise (proportional to the clip) follows the updates as they shrink over training.
/// `unclipped` is the noisy count, `n` the updates it counts.
pub fn next_clip(
    clip: f64,
    unclipped: f64,
    n: usize,
    target_quantile: f64,
    learning_rate: f64,
) -> f64 {
    let fraction = (unclipped / n.max(1) as f64).clamp(0.0, 1.0);
    clip * (-learning_rate * (fraction - target_quantile)).exp()
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
    /// Bound on |mean - exact weighted mean of the clipped deltas|, per element, from
    /// rounding (the noise below is not an error: it is the point).
    pub error_bound: f64,
    /// With noise: the standard deviation of the noise in each value of the mean,
    /// √survivors · σ / (s · survivors). 0 without.
    pub noise_std: f64,
}

/// Turns the unmasked sum of `survivors` quantised vectors into the weighted mean delta.
pub fn dequantise<W: Word>(
    params: &Params,
    sum: &[W],
    survivors: usize,
) -> Result<Aggregate, QuantError> {
    let d = Dequantiser::new(params, sum.len(), sum.get(WEIGHT_INDEX).copied(), survivors)?;
    let mut sq = 0.0;
    for (i, z) in sum.iter().enumerate() {
        d.check(i, *z, params.dim)?;
        if i >= VALUES_OFFSET {
            sq += d.weighted_sum(*z).powi(2);
        }
    }
    d.check_norm(sq)?;
    Ok(Aggregate {
        total_weight: d.total_weight,
        clipped: sum[CLIPPED_INDEX].to_u64(),
        survivors,
        mean: sum[VALUES_OFFSET..].iter().map(|z| d.mean(*z)).collect(),
        error_bound: if params.noise.is_some() {
            survivors as f64 / (d.scale * survivors as f64)
        } else {
            error_bound(params, survivors, d.total_weight)
        },
        noise_std: d.noise_std(),
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
    noisy: Option<Noisy>,
    /// With [`Params::norm_bound`]: the largest L2 norm Σ w'Δ can have, rounding included.
    max_norm: Option<f64>,
}

/// How a noisy sum is read: as a signed distance from the centre of the survivors' range,
/// since noise can push a value below 0 (wrapping to the top of the ring) or above the range.
#[derive(Debug, Clone, Copy)]
struct Noisy {
    /// ⌊survivors · (2^q − 1) / 2⌋, the integer the distance is measured from.
    centre: u64,
    /// survivors · (2^q − 1) / 2 − centre: 0 or ½.
    centre_frac: f64,
    /// The largest |distance| an honest sum reaches: half the range plus the noise's tail.
    max_offset: f64,
    /// Standard deviation of the summed noise, in steps.
    sum_sigma: f64,
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
        let top = (1u64 << params.quant_bits) - 1;
        if let Some(noise) = params.noise {
            if survivors < noise.min_survivors as usize {
                return Err(QuantError::TooFewForNoise {
                    survivors,
                    min: noise.min_survivors,
                });
            }
            if total_weight != survivors as u64 {
                return Err(QuantError::NoisyWeight {
                    total: total_weight,
                    survivors,
                });
            }
            let half = survivors as f64 * top as f64 / 2.0;
            let sum_sigma = noise.sigma * (survivors as f64).sqrt();
            return Ok(Dequantiser {
                total_weight,
                survivors: survivors as u64,
                max_value: 0,
                scale: scale(params),
                offset: 0.0,
                w_frac_sum: survivors as f64,
                noisy: Some(Noisy {
                    centre: half.floor() as u64,
                    centre_frac: half - half.floor(),
                    max_offset: half + NOISE_TAIL * sum_sigma + 1.0,
                    sum_sigma,
                }),
                max_norm: None,
            });
        }
        let max = (survivors as u64).saturating_mul(params.max_weight);
        if total_weight > max {
            return Err(QuantError::WeightOutOfRange {
                total: total_weight,
                max,
            });
        }
        Ok(Dequantiser {
            total_weight,
            survivors: survivors as u64,
            max_value: (survivors as u64).saturating_mul(top),
            scale: scale(params),
            offset: survivors as f64 * params.clip as f64,
            // Σ w' = Σ w / W
            w_frac_sum: total_weight as f64 / params.max_weight as f64,
            noisy: None,
            // ‖Σ w'Δ‖ ≤ Σ w'·B; each site's rounding moves each value by under one step.
            max_norm: params.norm_bound.map(|b| {
                let w_frac_sum = total_weight as f64 / params.max_weight as f64;
                w_frac_sum * f64::from(b)
                    + survivors as f64 * f64::from(params.dim).sqrt() / scale(params)
            }),
        })
    }

    /// Σ w'Δ for one summed value (from [`VALUES_OFFSET`] on), before the division by Σ w'
    /// that gives the mean: what [`Dequantiser::check_norm`] sums the squares of.
    pub fn weighted_sum<W: Word>(&self, z: W) -> f64 {
        if let Some(n) = &self.noisy {
            return Self::offset_of(n, z) / self.scale;
        }
        z.to_u64() as f64 / self.scale - self.offset
    }

    /// With a norm bound: refuses a sum whose L2 norm (`sum_sq`, the sum of the squares of
    /// [`Dequantiser::weighted_sum`] over every value) no inputs within the bound can reach.
    /// Catches a site that skipped the scaling only when its update is large enough to push
    /// the whole sum out; that is all a sum can show.
    pub fn check_norm(&self, sum_sq: f64) -> Result<(), QuantError> {
        match self.max_norm {
            Some(max) if sum_sq.sqrt() > max => Err(QuantError::NormOutOfRange {
                norm: sum_sq.sqrt(),
                max,
            }),
            _ => Ok(()),
        }
    }

    /// The standard deviation of the noise in each value of the mean (0 without noise).
    pub fn noise_std(&self) -> f64 {
        self.noisy
            .map_or(0.0, |n| n.sum_sigma / (self.scale * self.survivors as f64))
    }

    /// A noisy summed value as its signed distance from the centre, in steps.
    fn offset_of<W: Word>(n: &Noisy, z: W) -> f64 {
        let d = z.wrapping_sub(W::from_u64_wrapping(n.centre)).to_signed();
        d as f64 - n.centre_frac
    }

    /// Checks a summed element `z` at `index` of the sum: from [`VALUES_OFFSET`] on each is a
    /// sum of `survivors` values in [0, 2^q - 1], and the clipped count is at most one per
    /// value and survivor. Run over the whole sum before any of it is applied.
    pub fn check<W: Word>(&self, index: usize, z: W, dim: u32) -> Result<(), QuantError> {
        let value = z.to_u64();
        if let Some(n) = &self.noisy {
            return match index {
                WEIGHT_INDEX => Ok(()),
                CLIPPED_INDEX if value != 0 => Err(QuantError::NoisyClipped { clipped: value }),
                CLIPPED_INDEX => Ok(()),
                _ => {
                    let offset = Self::offset_of(n, z);
                    if offset.abs() > n.max_offset {
                        Err(QuantError::NoisyValueOutOfRange {
                            index,
                            offset,
                            max: n.max_offset,
                        })
                    } else {
                        Ok(())
                    }
                }
            };
        }
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
        if let Some(n) = &self.noisy {
            // The centre is the sum of survivors zero updates: the distance is Σ x · s + noise.
            return (Self::offset_of(n, z) / self.scale / self.w_frac_sum) as f32;
        }
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
                weight_capped: false,
                norm_scaled: false
            }
        );
        assert_eq!(
            rb,
            ClipReport {
                clipped: 1,
                weight_capped: true,
                norm_scaled: false
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

    fn noisy(dim: u32, sigma: f64, min_survivors: u32) -> Params {
        Params {
            noise: Some(Noise {
                sigma,
                min_survivors,
            }),
            ..params(dim, 16, 1.0)
        }
    }

    /// With noise: the update is scaled to L2 norm `clip`, each site counts once, and values
    /// that noise pushed below 0 (wrapping to the top of the ring) or above the range decode
    /// to where they belong.
    #[test]
    fn a_noisy_sum_decodes_around_the_unweighted_mean_of_the_clipped_updates() {
        let p = noisy(3, 40.0, 2);
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        // Norm 5: scaled to (0.6, -0.8, 0); norm 0.5: kept.
        let (a, ra) = quantise::<u32, _>(&p, &[3.0, -4.0, 0.0], 10, &mut rng).unwrap();
        let (b, rb) = quantise::<u32, _>(&p, &[0.0, -0.5, 0.0], 900, &mut rng).unwrap();
        assert_eq!((ra.clipped, rb.clipped), (1, 0));
        assert_eq!(&a.values()[..2], &[1, 0]);
        let mut sum = vec![0u32; p.vector_len()];
        crate::secagg::word::add_assign(&mut sum, a.values());
        crate::secagg::word::add_assign(&mut sum, b.values());
        let agg = dequantise(&p, &sum, 2).unwrap();
        assert_eq!((agg.total_weight, agg.clipped), (2, 0));
        let s = 65535.0 / 2.0;
        assert!((agg.noise_std - 40.0 * 2f64.sqrt() / (s * 2.0)).abs() < 1e-12);
        for (got, want) in agg.mean.iter().zip([0.3, -0.65, 0.0]) {
            // 6 noise standard deviations plus rounding.
            let err = (f64::from(*got) - want).abs();
            assert!(
                err < 6.0 * agg.noise_std + agg.error_bound,
                "{got} vs {want}"
            );
        }
        // A value at the bottom of the range: noise wraps about half the inputs around 0.
        let p = noisy(1, 50.0, 3);
        let mut wrapped = 0;
        for _ in 0..100 {
            let mut sum = vec![0u64; p.vector_len()];
            for _ in 0..3 {
                let (x, _) = quantise::<u64, _>(&p, &[-1.0], 1, &mut rng).unwrap();
                wrapped += usize::from(x.values()[VALUES_OFFSET] > u64::MAX / 2);
                crate::secagg::word::add_assign(&mut sum, x.values());
            }
            let agg = dequantise(&p, &sum, 3).unwrap();
            let err = (f64::from(agg.mean[0]) + 1.0).abs();
            assert!(
                err < 6.0 * agg.noise_std + agg.error_bound,
                "{:?}",
                agg.mean
            );
        }
        assert!(
            (100..200).contains(&wrapped),
            "{wrapped} of 300 inputs wrapped"
        );
    }

    /// With a norm bound, honest sites scale their whole update down to it (then the
    /// per-value clip); a sum of such inputs passes, and one with an input that skipped the
    /// scaling — every value in range, the norm far beyond — is refused by its norm.
    #[test]
    fn a_norm_bound_scales_updates_and_a_sum_beyond_it_is_refused() {
        let p = Params {
            norm_bound: Some(0.5),
            ..params(4, 16, 1.0)
        };
        p.validate().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        // Norm 2: scaled to 0.5 → (0.25, 0.25, 0.25, 0.25).
        let (a, ra) = quantise::<u64, _>(&p, &[1.0, 1.0, 1.0, 1.0], 500, &mut rng).unwrap();
        assert!(ra.norm_scaled && ra.clipped == 0, "{ra:?}");
        let (b, rb) = quantise::<u64, _>(&p, &[0.1, 0.0, 0.0, 0.0], 500, &mut rng).unwrap();
        assert!(!rb.norm_scaled);
        let mut sum = vec![0u64; p.vector_len()];
        crate::secagg::word::add_assign(&mut sum, a.values());
        crate::secagg::word::add_assign(&mut sum, b.values());
        let agg = dequantise(&p, &sum, 2).unwrap();
        assert!((agg.mean[1] - 0.125).abs() < 1e-3, "{:?}", agg.mean);
        // A site that skipped the scaling: (1, 1, 1, 1), every value within the clip.
        let unscaled = Params {
            norm_bound: None,
            ..p.clone()
        };
        let (c, _) = quantise::<u64, _>(&unscaled, &[1.0, 1.0, 1.0, 1.0], 500, &mut rng).unwrap();
        let mut sum = vec![0u64; p.vector_len()];
        crate::secagg::word::add_assign(&mut sum, c.values());
        crate::secagg::word::add_assign(&mut sum, b.values());
        assert!(matches!(
            dequantise(&p, &sum, 2),
            Err(QuantError::NormOutOfRange { .. })
        ));
        // The same sum without a bound passes: only the bound sees it.
        assert!(dequantise(&unscaled, &sum, 2).is_ok());
    }

    #[test]
    fn a_noisy_sum_no_honest_sites_can_make_is_refused() {
        let p = noisy(2, 10.0, 3);
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut sum = vec![0u32; p.vector_len()];
        for _ in 0..3 {
            let (x, _) = quantise::<u32, _>(&p, &[0.1, 0.2], 1, &mut rng).unwrap();
            crate::secagg::word::add_assign(&mut sum, x.values());
        }
        assert!(dequantise(&p, &sum, 3).is_ok());
        // Fewer survivors than the noise was sized for.
        assert_eq!(
            dequantise(&p, &sum, 2).unwrap_err(),
            QuantError::TooFewForNoise {
                survivors: 2,
                min: 3
            }
        );
        // A weight element other than 1 per site.
        let mut heavy = sum.clone();
        heavy[WEIGHT_INDEX] = 4;
        assert!(matches!(
            dequantise(&p, &heavy, 3),
            Err(QuantError::NoisyWeight { total: 4, .. })
        ));
        let mut counted = sum.clone();
        counted[CLIPPED_INDEX] = 1;
        assert_eq!(
            dequantise(&p, &counted, 3).unwrap_err(),
            QuantError::NoisyClipped { clipped: 1 }
        );
        // A site that adds 2^30 to a value: far beyond the range plus 20 σ√3.
        let mut pushed = sum.clone();
        pushed[VALUES_OFFSET] = pushed[VALUES_OFFSET].wrapping_add(1 << 30);
        assert!(matches!(
            dequantise(&p, &pushed, 3),
            Err(QuantError::NoisyValueOutOfRange { index: 2, .. })
        ));
        let mut pulled = sum;
        pulled[VALUES_OFFSET + 1] = pulled[VALUES_OFFSET + 1].wrapping_sub(1 << 30);
        assert!(matches!(
            dequantise(&p, &pulled, 3),
            Err(QuantError::NoisyValueOutOfRange { index: 3, .. })
        ));
    }

    /// With the exact count, adaptive clipping settles at the target quantile of the norms:
    /// 10 updates of norms 0.1 … 1.0, median target, from a clip 4× too large.
    #[test]
    fn adaptive_clipping_follows_the_target_quantile_of_the_norms() {
        let norms: Vec<f64> = (1..=10).map(|i| f64::from(i) / 10.0).collect();
        let mut clip = 4.0;
        for _ in 0..300 {
            let unclipped = norms.iter().filter(|n| **n <= clip).count() as f64;
            clip = next_clip(clip, unclipped, norms.len(), 0.5, 0.2);
        }
        assert!((0.45..=0.65).contains(&clip), "{clip}");
        // A larger target keeps more updates whole.
        let mut high = 4.0;
        for _ in 0..300 {
            let unclipped = norms.iter().filter(|n| **n <= high).count() as f64;
            high = next_clip(high, unclipped, norms.len(), 0.9, 0.2);
        }
        assert!(high > clip && (0.85..=1.05).contains(&high), "{high}");
    }

    #[test]
    fn a_central_release_refuses_what_it_cannot_price() {
        let p = params(3, 16, 1.0);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        assert_eq!(
            central_release(&p, &[], 1.0, &mut rng).unwrap_err(),
            QuantError::NoSurvivors
        );
        assert!(matches!(
            central_release(&p, &[&[0.0, 1.0]], 1.0, &mut rng),
            Err(QuantError::WrongLength { got: 2, .. })
        ));
        assert!(matches!(
            central_release(&p, &[&[0.0, f32::INFINITY, 0.0]], 1.0, &mut rng),
            Err(QuantError::NotFinite { index: 1, .. })
        ));
        // Scaled to norm 1: (0.6, 0.8, 0) from (3, 4, 0), one update counted as scaled.
        let (agg, scaled) = central_release(&p, &[&[3.0, 4.0, 0.0]], 1.0, &mut rng).unwrap();
        assert_eq!((scaled, agg.total_weight, agg.survivors), (1, 1, 1));
        assert!((agg.noise_std - p.l2_sensitivity() / (65535.0 / 2.0)).abs() < 1e-12);
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
