//! Rényi DP of the (subsampled) Gaussian mechanism and its conversion to (ε, δ).
//!
//! The subsampled Gaussian follows Mironov, Talwar and Zhang, "Rényi Differential Privacy of
//! the Sampled Gaussian Mechanism" (2019): a closed sum for integer orders (their §3.2) and
//! the two-sided series for fractional ones (§3.3). The conversion is Proposition 12 of
//! Canonne, Kamath and Steinke (2020), the bound `dp-accounting` uses too. Everything is
//! computed in log space: at σ = 0.5 and α = 1024 the terms are far beyond `f64`.

use thiserror::Error;

/// The orders at which the RDP curve is kept: dense near 1, where small budgets are
/// decided, sparse far out, where strong noise is. The same grid as Google's
/// `dp-accounting` (`DEFAULT_RDP_ORDERS`), so the two agree order by order.
pub const DEFAULT_ORDERS: [f64; 156] = default_orders();

const fn default_orders() -> [f64; 156] {
    let mut orders = [0.0; 156];
    let mut i = 0;
    // 1.1, 1.2, ..., 10.9
    while i < 99 {
        orders[i] = 1.0 + (i as f64 + 1.0) / 10.0;
        i += 1;
    }
    // 11, 12, ..., 63
    while i < 152 {
        orders[i] = (i - 99 + 11) as f64;
        i += 1;
    }
    orders[152] = 128.0;
    orders[153] = 256.0;
    orders[154] = 512.0;
    orders[155] = 1024.0;
    orders
}

/// A release the accountant can price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mechanism {
    /// Each record is included independently with probability `sampling_rate` (Poisson
    /// sampling), the sum of the included records' clipped contributions gets Gaussian
    /// noise of standard deviation `noise_multiplier` × the clipping bound. With a rate of
    /// 1 this is the plain Gaussian mechanism (a site-level release of a clipped update).
    SubsampledGaussian {
        sampling_rate: f64,
        noise_multiplier: f64,
    },
}

/// What the accountant refuses: parameters for which no guarantee is meaningful.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PrivacyError {
    #[error("sampling rate {0} is not in [0, 1]")]
    SamplingRate(f64),
    #[error("noise multiplier {0} is not a positive number: no noise means no privacy")]
    NoiseMultiplier(f64),
    #[error("delta {0} is not in (0, 1)")]
    Delta(f64),
    #[error("the orders must be finite and above 1 ({0} is not)")]
    Order(f64),
}

/// An (ε, δ) guarantee and the Rényi order that gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
    pub order: f64,
}

/// The running RDP curve of everything released so far.
///
/// Invariant: `rdp[i]` is the RDP at `orders[i]` of the composition of every mechanism
/// [`Accountant::compose`] accepted, and never decreases. A refused composition leaves the
/// curve as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for Accountant {
    fn default() -> Self {
        Accountant {
            orders: DEFAULT_ORDERS.to_vec(),
            rdp: vec![0.0; DEFAULT_ORDERS.len()],
        }
    }
}

impl Accountant {
    /// Nothing spent yet, on the [`DEFAULT_ORDERS`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An accountant resumed from a curve it stored (`rdp` at `orders`), e.g. an agent's
    /// after a restart.
    pub fn resume(orders: Vec<f64>, rdp: Vec<f64>) -> Result<Self, PrivacyError> {
        if let Some(&bad) = orders.iter().find(|a| !(a.is_finite() && **a > 1.0)) {
            return Err(PrivacyError::Order(bad));
        }
        if orders.len() != rdp.len() || rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
            return Err(PrivacyError::Order(f64::NAN));
        }
        Ok(Accountant { orders, rdp })
    }

    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The RDP curve at [`Accountant::orders`].
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Adds `count` releases of `mechanism`.
    pub fn compose(&mut self, mechanism: Mechanism, count: u64) -> Result<(), PrivacyError> {
        let step = curve(mechanism, &self.orders)?;
        for (total, r) in self.rdp.iter_mut().zip(step) {
            *total += r * count as f64;
        }
        Ok(())
    }

    /// The smallest ε, over the orders, such that everything released so far is (ε, δ)-DP.
    pub fn epsilon(&self, delta: f64) -> Result<Spent, PrivacyError> {
        epsilon(&self.orders, &self.rdp, delta)
    }

    /// What ε would be after `count` more releases of `mechanism`, without spending them:
    /// the question a site asks before it trains.
    pub fn epsilon_after(
        &self,
        mechanism: Mechanism,
        count: u64,
        delta: f64,
    ) -> Result<Spent, PrivacyError> {
        let mut next = self.clone();
        next.compose(mechanism, count)?;
        next.epsilon(delta)
    }
}

/// The RDP of one release of `mechanism` at each of `orders`.
fn curve(mechanism: Mechanism, orders: &[f64]) -> Result<Vec<f64>, PrivacyError> {
    let Mechanism::SubsampledGaussian {
        sampling_rate: q,
        noise_multiplier: sigma,
    } = mechanism;
    if !(0.0..=1.0).contains(&q) {
        return Err(PrivacyError::SamplingRate(q));
    }
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(PrivacyError::NoiseMultiplier(sigma));
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if q == 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else if alpha.fract() == 0.0 {
                log_a_int(q, sigma, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_frac(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// Proposition 12 of Canonne, Kamath and Steinke (2020), minimised over the orders.
fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<Spent, PrivacyError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    let mut best = Spent {
        epsilon: f64::INFINITY,
        delta,
        order: f64::NAN,
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            // δ ≥ sqrt(1 − e^{−KL}) already: nothing to pay at this order.
            0.0
        } else if a > 1.01 {
            // Unstable as α → 1, and useless there anyway.
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.epsilon {
            best = Spent {
                epsilon: eps.max(0.0),
                delta,
                order: a,
            };
        }
    }
    Ok(best)
}

/// log(e^x + e^y), exact when one of them is −∞.
fn log_add(x: f64, y: f64) -> f64 {
    let (lo, hi) = if x < y { (x, y) } else { (y, x) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// log |C(n, k)| for real n, through log |Γ|.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log erfc(x), accurate far into the tail where erfc itself underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 0.0 {
        return r.ln();
    }
    // The asymptotic series of log erfc at +∞ (only reached for x > 26).
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

/// log A_α for integer α: the binomial expansion of E[(1 − q + q·e^{(2z−1)/(2σ²)})^α].
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let term =
            log_comb(a, i) + i * log_q + (a - i) * log_1mq + (i * i - i) / (2.0 * sigma * sigma);
        log_add(acc, term)
    })
}

/// log A_α for fractional α: the integral split at z₀ where the two densities cross, each
/// side a convergent series.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    for i in 0..1000u32 {
        let i = f64::from(i);
        let coef = log_comb(alpha, i);
        let j = alpha - i;
        let t0 = coef + i * log_q + j * log_1mq;
        let t1 = coef + j * log_q + i * log_1mq;
        let e0 = 0.5f64.ln() + log_erfc((i - z0) / sqrt2_sigma);
        let e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2_sigma);
        let s0 = t0 + (i * i - i) / (2.0 * sigma * sigma) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * sigma * sigma) + e1;
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (s0, s1);
    }
    // Not converged: this order gives no bound (the others still do).
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELTA: f64 = 1e-5;

    fn gaussian(q: f64, sigma: f64) -> Mechanism {
        Mechanism::SubsampledGaussian {
            sampling_rate: q,
            noise_multiplier: sigma,
        }
    }

    /// Without sampling, the Gaussian mechanism's RDP is α / 2σ² exactly, and n releases
    /// cost n times as much at every order.
    #[test]
    fn the_plain_gaussian_has_its_closed_form_and_composes_linearly() {
        let mut acc = Accountant::new();
        acc.compose(gaussian(1.0, 2.0), 3).unwrap();
        for (a, r) in acc.orders().iter().zip(acc.rdp()) {
            assert!((r - 3.0 * a / 8.0).abs() < 1e-12, "order {a}: {r}");
        }
    }

    /// Sampling amplifies privacy: a smaller rate never costs more, at any order, and the
    /// integer and fractional series agree where they meet (α = 2 from either side).
    #[test]
    fn subsampling_costs_less_and_the_two_series_agree() {
        // Integer orders: near α = 1 at q = 1/2 the fractional series converges too slowly
        // to give a bound (dp-accounting drops such orders as well).
        let orders = [2.0, 3.0, 8.0, 32.0];
        let mut last = vec![0.0; orders.len()];
        for q in [0.001, 0.01, 0.1, 0.5, 1.0] {
            let c = curve(gaussian(q, 1.1), &orders).unwrap();
            for (x, y) in c.iter().zip(&last) {
                assert!(x >= y, "rate {q}: {c:?} vs {last:?}");
            }
            last = c;
        }
        let int = log_a_int(0.05, 1.3, 2);
        let near = log_a_frac(0.05, 1.3, 2.000_001);
        assert!((int - near).abs() < 1e-4, "{int} vs {near}");
    }

    /// More releases never give a smaller ε; nothing released gives ε = 0; no noise or a rate
    /// outside [0, 1] is refused and leaves the curve untouched.
    #[test]
    fn epsilon_grows_with_releases_and_bad_parameters_are_refused() {
        let mut acc = Accountant::new();
        assert_eq!(acc.epsilon(DELTA).unwrap().epsilon, 0.0);
        let mut last = 0.0;
        for _ in 0..5 {
            acc.compose(gaussian(0.01, 1.0), 100).unwrap();
            let eps = acc.epsilon(DELTA).unwrap().epsilon;
            assert!(eps > last, "{eps} after {last}");
            last = eps;
        }
        let before = acc.clone();
        assert_eq!(
            acc.compose(gaussian(0.01, 0.0), 1),
            Err(PrivacyError::NoiseMultiplier(0.0))
        );
        assert_eq!(
            acc.compose(gaussian(1.5, 1.0), 1),
            Err(PrivacyError::SamplingRate(1.5))
        );
        assert_eq!(acc, before);
        assert_eq!(acc.epsilon(0.0), Err(PrivacyError::Delta(0.0)));
        let ahead = acc.epsilon_after(gaussian(0.01, 1.0), 100, DELTA).unwrap();
        assert!(ahead.epsilon > last);
        assert_eq!(acc, before, "asking does not spend");
    }

    /// A resumed curve gives the same ε as the accountant it came from.
    #[test]
    fn a_resumed_accountant_continues_where_it_stopped() {
        let mut acc = Accountant::new();
        acc.compose(gaussian(0.02, 0.9), 250).unwrap();
        let back = Accountant::resume(acc.orders().to_vec(), acc.rdp().to_vec()).unwrap();
        assert_eq!(back.epsilon(DELTA), acc.epsilon(DELTA));
        assert!(Accountant::resume(vec![0.5], vec![0.0]).is_err());
        assert!(Accountant::resume(vec![2.0], vec![-1.0]).is_err());
    }
}
