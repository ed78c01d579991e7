//! Round parameters and their validation.
//!
//! Every parameter that can silently destroy privacy or correctness is checked here, once, at
//! set-up, so the state machines can rely on them. Error messages name the parameter, its value
//! and a value that would work, because the person reading them is editing a TOML file.

use thiserror::Error;

/// The modulus of the masked arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modulus {
    /// Arithmetic in Z/2^32: half the bytes of [`Modulus::Bits64`], enough for up to
    /// 2^32 / 2^q sites.
    Bits32,
    /// Arithmetic in Z/2^64.
    Bits64,
}

impl Modulus {
    pub fn bits(self) -> u32 {
        match self {
            Modulus::Bits32 => 32,
            Modulus::Bits64 => 64,
        }
    }

    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            32 => Some(Modulus::Bits32),
            64 => Some(Modulus::Bits64),
            _ => None,
        }
    }
}

/// Parameters of one secure-aggregation round. Everyone in the round must use the same values;
/// the server sends them in [`crate::secagg::Setup`] and every client validates them again, so a
/// server cannot talk clients into an insecure threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// n: sites selected for the round.
    pub sites: u32,
    /// k: size of each site's neighbourhood in the SecAgg+ graph, the site itself included.
    /// `k == n` is classic SecAgg (everyone masks with everyone).
    pub neighbours: u32,
    /// t: shares needed to reconstruct a secret; also the least number of live neighbours every
    /// site must keep at every stage.
    pub threshold: u32,
    /// d: length of the model delta. The masked vector has `d + 2` elements (see
    /// [`crate::secagg::quant`]).
    pub dim: u32,
    /// c: deltas are clipped to `[-c, c]` before quantisation.
    pub clip: f32,
    /// q: bits per quantised value.
    pub quant_bits: u32,
    pub modulus: Modulus,
    /// W: the example count a site reports is capped at this, so one large site cannot dominate
    /// the mean and the weight fits the modulus.
    pub max_weight: u64,
    /// Run the consistency-check stage of Bonawitz et al. (clients sign the survivor set before
    /// revealing shares). Needed against a server that lies about who dropped out.
    pub consistency_check: bool,
    /// Site-level differential privacy: each site's own noise, added before masking. Part of
    /// the set-up, hence of the round context every site signs under, so no site can be told a
    /// smaller σ than its peers.
    pub noise: Option<Noise>,
    /// B: honest sites scale their update to at most this L2 norm before quantising it (the
    /// per-value `clip` still applies after). Secure aggregation hides each update, so this is
    /// the one bound on a site's influence the coordinator can have sites apply; the unmasked
    /// sum is refused if its norm is beyond what inputs within it can reach. In the set-up,
    /// so in the round context. Without noise only (with noise, `clip` is the L2 bound).
    pub norm_bound: Option<f32>,
}

/// The distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021): with it, every
/// site scales its whole update to L2 norm at most [`Params::clip`], quantises it, adds
/// N_Z(0, σ²) to every value and only then masks it. No one — not the coordinator, not a peer
/// — ever sees a value without noise, and the unmasked sum carries the noise of every
/// survivor: variance survivors × σ² per value.
///
/// With noise every site counts once (the weight element is 1, the mean unweighted: a
/// site's example count would be a second, unnoised release about it) and the clipped
/// counter is not sent (whether a site's norm was clipped is a fact about its data too; the
/// site logs it itself).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    /// σ of the discrete Gaussian each site adds to each value, in quantisation steps.
    pub sigma: f64,
    /// The fewest survivors the noise was sized for. A sum over fewer carries less noise than
    /// the guarantee assumes, so it is refused when dequantised.
    pub min_survivors: u32,
}

/// How many standard deviations of the summed noise the modulus must leave room for on each
/// side. P[|N(0, 1)| > 20] < 6e-89: no honest sum ever wraps around.
pub const NOISE_TAIL: f64 = 20.0;

/// The largest model dimension the protocol accepts (2^31 - 3, so `d + 2` fits an `i32`).
pub const MAX_DIM: u32 = (1 << 31) - 3;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ParamError {
    #[error(
        "sites = {sites}: secure aggregation needs at least 3 sites (with 2, each learns the other's update from the sum)"
    )]
    TooFewSites { sites: u32 },
    #[error(
        "neighbours = {neighbours} with sites = {sites}: neighbours must be between 3 and sites; try neighbours = {suggested}"
    )]
    NeighboursOutOfRange {
        neighbours: u32,
        sites: u32,
        suggested: u32,
    },
    #[error(
        "neighbours = {neighbours} is even and smaller than sites = {sites}: the neighbour ring needs (neighbours - 1) / 2 peers on each side, so use an odd value such as {suggested}, or neighbours = sites for classic SecAgg"
    )]
    NeighboursEven {
        neighbours: u32,
        sites: u32,
        suggested: u32,
    },
    #[error(
        "threshold = {threshold} with neighbours = {neighbours}: a threshold of at most half the neighbourhood lets a server collect both kinds of share for one site from two disjoint groups, which breaks privacy; use a threshold between {min} and {max}, e.g. {suggested}"
    )]
    ThresholdTooLow {
        threshold: u32,
        neighbours: u32,
        min: u32,
        max: u32,
        suggested: u32,
    },
    #[error(
        "threshold = {threshold} with neighbours = {neighbours}: the round could not survive a single dropout; use a threshold between {min} and {max}, e.g. {suggested}"
    )]
    ThresholdTooHigh {
        threshold: u32,
        neighbours: u32,
        min: u32,
        max: u32,
        suggested: u32,
    },
    #[error("dim = {dim}: the model dimension must be between 1 and {MAX_DIM}")]
    BadDim { dim: u32 },
    #[error("clip = {clip}: the clipping range must be a finite number greater than 0")]
    BadClip { clip: f32 },
    #[error("quant_bits = {quant_bits}: must be between 1 and {max} for modulus 2^{modulus_bits}")]
    BadQuantBits {
        quant_bits: u32,
        max: u32,
        modulus_bits: u32,
    },
    #[error("max_weight = 0: the weight cap must be at least 1")]
    BadMaxWeight,
    #[error(
        "norm_bound = {bound}: the L2 bound on each update must be a finite number greater than 0, and is not used with site-level noise (whose clip is the L2 bound)"
    )]
    BadNormBound { bound: f32 },
    #[error(
        "noise sigma = {sigma}: the discrete Gaussian's standard deviation must be a finite number of at least 1 quantisation step"
    )]
    BadNoise { sigma: f64 },
    #[error(
        "noise min_survivors = {min_survivors} with sites = {sites}: the noise must be sized for between 1 and the round's sites"
    )]
    BadMinSurvivors { min_survivors: u32, sites: u32 },
    #[error(
        "sites = {sites} with quant_bits = {quant_bits} and noise sigma = {sigma}: the sum plus {NOISE_TAIL} standard deviations of its noise on each side does not fit the modulus 2^{modulus_bits}, so an honest sum could wrap around; use fewer quant_bits, less noise or modulus 64"
    )]
    NoiseOverflow {
        sites: u32,
        quant_bits: u32,
        sigma: f64,
        modulus_bits: u32,
    },
    #[error(
        "sites x {what} = {sites} x {value} does not fit the modulus 2^{modulus_bits}: the sum would wrap around and be wrong; {advice}"
    )]
    Overflow {
        sites: u32,
        what: &'static str,
        value: u64,
        modulus_bits: u32,
        advice: String,
    },
}

impl Params {
    /// The neighbourhood size the SecAgg+ paper suggests: 2⌈log2 n⌉ + 1, capped at n. Odd, so
    /// the ring graph is symmetric; logarithmic, so per-site cost grows as log n, not n.
    pub fn default_neighbours(sites: u32) -> u32 {
        if sites <= 1 {
            return sites;
        }
        let log2_ceil = 32 - (sites - 1).leading_zeros();
        (2 * log2_ceil + 1).min(sites)
    }

    /// ⌈k/2⌉ + 1, capped at k - 1: a strict majority of the neighbourhood (so two disjoint
    /// groups can never both reach it) that still tolerates dropouts.
    pub fn default_threshold(neighbours: u32) -> u32 {
        (neighbours.div_ceil(2) + 1).min(neighbours.saturating_sub(1))
    }

    /// The smallest threshold that keeps a site's input private against the server plus
    /// `colluders` sites in its neighbourhood, and at least [`Params::default_threshold`].
    ///
    /// Why t > (k + c) / 2: a lying server can tell some of a victim's honest neighbours that
    /// it survived (they reveal shares of its self-mask seed) and the others that it dropped
    /// (they reveal shares of its mask key); colluding sites sign either survivor set and reveal
    /// both kinds. It learns the input iff both kinds reach t, i.e. iff 2t <= k + c. The
    /// consistency check does not remove this: colluders' signatures count toward either set.
    pub fn threshold_for(neighbours: u32, colluders: u32) -> u32 {
        Self::default_threshold(neighbours).max(Self::min_threshold_against(neighbours, colluders))
    }

    /// The least t with 2t > k + c: the smallest threshold that resists c colluding sites.
    pub fn min_threshold_against(neighbours: u32, colluders: u32) -> u32 {
        (neighbours + colluders) / 2 + 1
    }

    /// How many colluding sites in a neighbourhood these parameters resist: the largest c with
    /// 2t > k + c (see [`Params::threshold_for`]).
    pub fn tolerated_colluders(&self) -> u32 {
        (2 * self.threshold).saturating_sub(self.neighbours + 1)
    }

    /// Parameters with the defaults above for everything but the sizes.
    pub fn with_defaults(sites: u32, dim: u32) -> Self {
        let neighbours = Self::default_neighbours(sites);
        Params {
            sites,
            neighbours,
            threshold: Self::default_threshold(neighbours),
            dim,
            clip: 1.0,
            quant_bits: 16,
            modulus: Modulus::Bits32,
            max_weight: 1000,
            consistency_check: false,
            noise: None,
            norm_bound: None,
        }
    }

    /// With [`Params::noise`]: one unmasked sum over `survivors` sites, as the accountant
    /// prices it (see [`crate::privacy::distributed_discrete_gaussian`]). None without noise
    /// or for parameters no accountant prices.
    pub fn noise_mechanism(&self, survivors: u32) -> Option<crate::privacy::Mechanism> {
        let noise = self.noise?;
        crate::privacy::distributed_discrete_gaussian(
            survivors,
            noise.sigma,
            self.l2_sensitivity(),
            u64::from(self.dim),
        )
        .ok()
    }

    /// With [`Params::noise`]: how far one site's quantised input can move the sum, in L2 norm
    /// and quantisation steps, between its real update and none at all (the neighbouring
    /// federation in which the site sends a zero update). The update scaled to norm `clip` is
    /// `clip × s = (2^q − 1)/2` steps long whatever `clip` is; stochastic rounding moves each
    /// of the `d` values of either input by less than a step, which adds under 2√d.
    pub fn l2_sensitivity(&self) -> f64 {
        let top = ((1u64 << self.quant_bits) - 1) as f64;
        top / 2.0 + 2.0 * f64::from(self.dim).sqrt()
    }

    /// Length of the masked vector: weight, clipped count, then `dim` quantised values.
    pub fn vector_len(&self) -> usize {
        self.dim as usize + 2
    }

    /// Checks every invariant the protocol relies on.
    pub fn validate(&self) -> Result<(), ParamError> {
        let (n, k, t) = (self.sites, self.neighbours, self.threshold);
        if n < 3 {
            return Err(ParamError::TooFewSites { sites: n });
        }
        let suggested_k = Self::default_neighbours(n);
        if k < 3 || k > n {
            return Err(ParamError::NeighboursOutOfRange {
                neighbours: k,
                sites: n,
                suggested: suggested_k,
            });
        }
        if k < n && k.is_multiple_of(2) {
            return Err(ParamError::NeighboursEven {
                neighbours: k,
                sites: n,
                suggested: k + 1,
            });
        }
        let (min_t, max_t) = (k / 2 + 1, k - 1);
        let suggested_t = Self::default_threshold(k);
        if t < min_t {
            return Err(ParamError::ThresholdTooLow {
                threshold: t,
                neighbours: k,
                min: min_t,
                max: max_t,
                suggested: suggested_t,
            });
        }
        if t > max_t {
            return Err(ParamError::ThresholdTooHigh {
                threshold: t,
                neighbours: k,
                min: min_t,
                max: max_t,
                suggested: suggested_t,
            });
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(ParamError::BadDim { dim: self.dim });
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(ParamError::BadClip { clip: self.clip });
        }
        let bits = self.modulus.bits();
        if self.quant_bits == 0 || self.quant_bits >= bits {
            return Err(ParamError::BadQuantBits {
                quant_bits: self.quant_bits,
                max: bits - 1,
                modulus_bits: bits,
            });
        }
        if self.max_weight == 0 {
            return Err(ParamError::BadMaxWeight);
        }
        // Each of the n summands of every element is below these bounds; their sum must stay
        // below 2^bits or unmasking yields the sum modulo 2^bits, i.e. garbage.
        let limit: u128 = 1u128 << bits;
        let q_max = (1u64 << self.quant_bits) - 1;
        let checks: [(&'static str, u64, String); 3] = [
            ("(2^quant_bits - 1)", q_max, {
                let fit = (limit / (n as u128 + 1)).max(1);
                let best_q = 127 - fit.leading_zeros();
                if bits == 32 {
                    format!(
                        "use quant_bits <= {best_q}, or modulus 64 with up to {} sites",
                        u64::MAX / q_max.max(1)
                    )
                } else {
                    format!("use quant_bits <= {best_q}")
                }
            }),
            (
                "max_weight",
                self.max_weight,
                format!(
                    "use max_weight <= {}{}",
                    (limit - 1) / n as u128,
                    if bits == 32 { " or modulus 64" } else { "" }
                ),
            ),
            (
                "dim (the clipped-value counter)",
                self.dim as u64,
                "use modulus 64 for models this large".to_string(),
            ),
        ];
        if let Some(bound) = self.norm_bound
            && (!(bound.is_finite() && bound > 0.0) || self.noise.is_some())
        {
            return Err(ParamError::BadNormBound { bound });
        }
        if let Some(noise) = self.noise {
            if !(noise.sigma.is_finite() && noise.sigma >= 1.0) {
                return Err(ParamError::BadNoise { sigma: noise.sigma });
            }
            if noise.min_survivors == 0 || noise.min_survivors > n {
                return Err(ParamError::BadMinSurvivors {
                    min_survivors: noise.min_survivors,
                    sites: n,
                });
            }
            // Unmasking reads the sum as a signed offset from its centre n(2^q − 1)/2, so
            // the whole span of honest sums must be narrower than the modulus.
            let span = n as f64 * q_max as f64
                + 2.0 * NOISE_TAIL * noise.sigma * f64::from(n).sqrt()
                + 2.0;
            if span >= limit as f64 {
                return Err(ParamError::NoiseOverflow {
                    sites: n,
                    quant_bits: self.quant_bits,
                    sigma: noise.sigma,
                    modulus_bits: bits,
                });
            }
        }
        for (what, value, advice) in checks {
            if n as u128 * value as u128 >= limit {
                return Err(ParamError::Overflow {
                    sites: n,
                    what,
                    value,
                    modulus_bits: bits,
                    advice,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_for_every_size() {
        for n in 3..=2000 {
            let p = Params::with_defaults(n, 10);
            assert_eq!(p.validate(), Ok(()), "sites = {n}: {p:?}");
        }
        assert_eq!(Params::default_neighbours(100), 15);
        assert_eq!(Params::default_threshold(15), 9);
        assert_eq!(Params::default_neighbours(1000), 21);
    }

    #[test]
    fn rejects_insecure_or_fragile_parameters() {
        let base = Params::with_defaults(10, 100);
        let cases: Vec<(Params, &str)> = vec![
            (
                Params {
                    sites: 2,
                    ..base.clone()
                },
                "at least 3 sites",
            ),
            (
                Params {
                    neighbours: 2,
                    ..base.clone()
                },
                "between 3 and sites",
            ),
            (
                Params {
                    neighbours: 11,
                    ..base.clone()
                },
                "between 3 and sites",
            ),
            (
                Params {
                    neighbours: 6,
                    ..base.clone()
                },
                "use an odd value such as 7",
            ),
            (
                Params {
                    neighbours: 7,
                    threshold: 3,
                    ..base.clone()
                },
                "threshold between 4 and 6",
            ),
            (
                Params {
                    neighbours: 7,
                    threshold: 7,
                    ..base.clone()
                },
                "single dropout",
            ),
            (
                Params {
                    dim: 0,
                    ..base.clone()
                },
                "dim = 0",
            ),
            (
                Params {
                    clip: f32::NAN,
                    ..base.clone()
                },
                "clip = NaN",
            ),
            (
                Params {
                    quant_bits: 32,
                    ..base.clone()
                },
                "quant_bits = 32",
            ),
            (
                Params {
                    max_weight: 0,
                    ..base.clone()
                },
                "max_weight = 0",
            ),
            (
                Params {
                    sites: 70_000,
                    neighbours: 33,
                    threshold: 18,
                    ..base.clone()
                },
                "use quant_bits <= 15",
            ),
            (
                Params {
                    max_weight: 1 << 30,
                    ..base.clone()
                },
                "max_weight <= 429496729",
            ),
            (
                Params {
                    noise: Some(Noise {
                        sigma: 0.5,
                        min_survivors: 6,
                    }),
                    ..base.clone()
                },
                "noise sigma = 0.5",
            ),
            (
                Params {
                    noise: Some(Noise {
                        sigma: f64::INFINITY,
                        min_survivors: 6,
                    }),
                    ..base.clone()
                },
                "noise sigma = inf",
            ),
            (
                Params {
                    noise: Some(Noise {
                        sigma: 100.0,
                        min_survivors: 11,
                    }),
                    ..base.clone()
                },
                "min_survivors = 11 with sites = 10",
            ),
            (
                Params {
                    norm_bound: Some(0.0),
                    ..base.clone()
                },
                "norm_bound = 0",
            ),
            (
                Params {
                    norm_bound: Some(1.0),
                    noise: Some(Noise {
                        sigma: 100.0,
                        min_survivors: 6,
                    }),
                    ..base.clone()
                },
                "not used with site-level noise",
            ),
            (
                // 2^32 − 10 × (2^16 − 1) leaves room for ±20 σ√10 only while σ < about 3.39e7.
                Params {
                    noise: Some(Noise {
                        sigma: 4e7,
                        min_survivors: 6,
                    }),
                    ..base.clone()
                },
                "could wrap around",
            ),
        ];
        for (p, needle) in cases {
            let err = p.validate().expect_err("must be rejected").to_string();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
        // classic SecAgg with an even number of sites is fine
        let classic = Params {
            sites: 10,
            neighbours: 10,
            threshold: 6,
            ..base
        };
        assert_eq!(classic.validate(), Ok(()));
        let noisy = Params {
            noise: Some(Noise {
                sigma: 3e7,
                min_survivors: 6,
            }),
            ..classic
        };
        assert_eq!(noisy.validate(), Ok(()));
        assert_eq!(
            Params {
                modulus: Modulus::Bits64,
                ..noisy.clone()
            }
            .with_noise_sigma(4e7)
            .validate(),
            Ok(())
        );
    }

    impl Params {
        fn with_noise_sigma(mut self, sigma: f64) -> Self {
            if let Some(n) = self.noise.as_mut() {
                n.sigma = sigma;
            }
            self
        }
    }
}
