//! Site-level DP (`[privacy.site_level]`): the federation's account of every noisy sum the
//! coordinator released, and the stop before the budget is passed. Under secure aggregation
//! the sites add the noise; in plain mode the coordinator does (central DP, with adaptive
//! clipping if asked): the same quantised mechanism, priced the same way.
//!
//! Under secure aggregation the sites add the noise (the set-up tells them σ; see
//! `CoordinatorConfig::training_params`) and refuse to unmask a sum over fewer survivors than
//! it was sized for, so the coordinator cannot spend more than it accounts here; what it can
//! get wrong is only its own report. It therefore counts a sum when it is unmasked, before
//! the sum is checked or used: an attempt whose sum is then refused still released it. A
//! redo of a round in which a site sends the same update resends the same noisy input (its
//! noise is seeded by the update) and releases nothing new, but is counted again — the
//! account errs on the side of spending; a DP-SGD site's fresh update is a new release, and
//! counted as one.

use cohort_protocols::privacy::{
    Accountant, DEFAULT_ORDERS, Mechanism, central_gaussian, discrete_gaussian,
};
use cohort_protocols::secagg::{Params, central_release, next_clip};
use serde::{Deserialize, Serialize};

use super::*;

/// Central DP quantises on a grid of 2C/2^24 per value: far finer than the noise it then
/// adds (σ = z·2^23 steps), and fixed, because `[secagg]` (whose quant_bits plain mode does
/// not validate) is not in use.
const CENTRAL_QUANT_BITS: u32 = 24;

/// The running account, resumed from the last committed round's curve.
#[derive(Debug, Clone)]
pub(super) struct SiteLevel {
    accountant: Accountant,
    delta: f64,
    budget: f64,
    /// Central DP: the L2 clip of the next round (moved by adaptive clipping).
    clip: f64,
    /// Central DP: the clip the current round used, for its record.
    used: Option<f64>,
}

/// Site-level DP as the status API and the run summary show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteLevelSpent {
    /// The federation's ε per site so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// `privacy.site_level.epsilon`.
    pub budget: f64,
    /// `privacy.site_level.noise_multiplier`: the noise of the fewest survivors a round
    /// accepts, over one site's sensitivity.
    pub noise_multiplier: f64,
    pub min_survivors: u32,
    /// "distributed" (the sites add the noise under secure aggregation) or "central" (the
    /// coordinator adds it, plain mode).
    pub mode: String,
    /// The L2 clip: fixed, or where adaptive clipping has moved it.
    pub clip: f64,
}

impl SiteLevel {
    pub(super) fn new(cfg: &CoordinatorConfig) -> Option<Self> {
        let dp = cfg.privacy.site_level.as_ref()?;
        Some(SiteLevel {
            accountant: Accountant::new(),
            delta: dp.delta,
            budget: dp.epsilon,
            clip: f64::from(dp.clip),
            used: None,
        })
    }
}

impl Driver {
    /// Picks up the account from the last committed round, if it carried one.
    pub(super) fn resume_site_level(&mut self, last: Option<&RoundRecord>) -> Result<(), String> {
        let Some(acc) = self.site_level.as_mut() else {
            return Ok(());
        };
        let Some(rdp) = last.and_then(|r| r.site_level_rdp.clone()) else {
            if let Some(r) = last {
                // Rounds before it released updates without this noise: the ε from here on
                // says nothing about them.
                warn!(
                    after_round = r.summary.round,
                    "[privacy.site_level] turned on in a run whose committed rounds carried no site-level noise: the federation's ε covers only the rounds from here on"
                );
            }
            return Ok(());
        };
        acc.accountant = Accountant::resume(DEFAULT_ORDERS.to_vec(), rdp)
            .map_err(|e| format!("the site-level privacy account of the last round: {e}"))?;
        if let Some(clip) = last.and_then(|r| r.site_level_clip) {
            if !(clip.is_finite() && clip > 0.0) {
                return Err(format!("the adaptive clip of the last round is {clip}"));
            }
            acc.clip = clip;
        }
        self.publish_site_level();
        Ok(())
    }

    /// Counts one unmasked noisy sum over `survivors` sites (called before the sum is used).
    pub(super) fn spend_site_level(
        &mut self,
        params: &Params,
        survivors: usize,
    ) -> Result<(), String> {
        let (Some(acc), Some(_)) = (self.site_level.as_mut(), params.noise) else {
            return Ok(());
        };
        let mechanism = params
            .noise_mechanism(survivors as u32)
            .ok_or("site-level privacy: the round's noise cannot be priced")?;
        acc.accountant
            .compose(mechanism, 1)
            .map_err(|e| format!("site-level privacy: {e}"))?;
        self.publish_site_level();
        Ok(())
    }

    /// Central DP (plain mode): the round's mean from each site's update, scaled to the
    /// current clip, with the coordinator's noise; counted before it is returned. With
    /// adaptive clipping the clip moves for the next round from the noisy count of updates
    /// left whole.
    pub(super) fn central_mean(&mut self, updates: &[(f64, Vec<f32>)]) -> Result<Vec<f32>, String> {
        let dim = self.spec.num_params() as u32;
        let (Some(acc), Some(dp)) = (
            self.site_level.as_mut(),
            self.cfg.privacy.site_level.as_ref(),
        ) else {
            return Err("central DP without [privacy.site_level]".into());
        };
        let params = Params {
            clip: acc.clip as f32,
            quant_bits: CENTRAL_QUANT_BITS,
            modulus: cohort_protocols::secagg::Modulus::Bits64,
            ..Params::with_defaults(3, dim)
        };
        let views: Vec<&[f32]> = updates.iter().map(|(_, u)| u.as_slice()).collect();
        let mut rng = rand::rng();
        let (agg, scaled) = central_release(&params, &views, dp.noise_multiplier, &mut rng)
            .map_err(|e| format!("central DP: {e}"))?;
        let count_noise = dp.adaptive_clip.as_ref().map(|a| a.count_noise);
        let mechanism = central_gaussian(dp.noise_multiplier, count_noise)
            .map_err(|e| format!("site-level privacy: {e}"))?;
        acc.accountant
            .compose(mechanism, 1)
            .map_err(|e| format!("site-level privacy: {e}"))?;
        acc.used = Some(acc.clip);
        if let Some(a) = &dp.adaptive_clip {
            let whole = (updates.len() - scaled) as f64;
            let noisy = whole + discrete_gaussian(a.count_noise, &mut rng) as f64;
            acc.clip = next_clip(
                acc.clip,
                noisy,
                updates.len(),
                a.target_quantile,
                a.learning_rate,
            );
        }
        self.publish_site_level();
        Ok(agg.mean)
    }

    /// Plain mode with `[privacy.site_level]`: the coordinator adds the noise.
    pub(super) fn central_dp(&self) -> bool {
        !self.secure() && self.site_level.is_some()
    }

    /// Central DP: the clip the round that just finished used.
    pub(super) fn round_clip(&self) -> Option<f64> {
        self.site_level.as_ref()?.used
    }

    /// Central DP: the clip the next round starts from (committed with the round).
    pub(super) fn next_site_clip(&self) -> Option<f64> {
        let acc = self.site_level.as_ref()?;
        (!self.secure()).then_some(acc.clip)
    }

    /// What one more round costs at most: under secure aggregation the sum over the fewest
    /// survivors a round accepts; in plain mode the coordinator's own noise (and count).
    fn next_round(&self) -> Option<Mechanism> {
        let dp = self.cfg.privacy.site_level.as_ref()?;
        if !self.secure() {
            return central_gaussian(
                dp.noise_multiplier,
                dp.adaptive_clip.as_ref().map(|a| a.count_noise),
            )
            .ok();
        }
        let p = self
            .cfg
            .training_params(self.cfg.rounds.min_sites, self.spec.num_params() as u32);
        p.noise_mechanism(self.cfg.min_survivors())
    }

    fn publish_site_level(&self) {
        if let Some(s) = self.site_level_spent() {
            self.progress.site_level(s.clone());
            self.metrics.site_epsilon.set(s.epsilon);
        }
    }

    pub(super) fn site_level_spent(&self) -> Option<SiteLevelSpent> {
        let acc = self.site_level.as_ref()?;
        let dp = self.cfg.privacy.site_level.as_ref()?;
        Some(SiteLevelSpent {
            epsilon: acc.accountant.epsilon(acc.delta).ok()?.epsilon,
            delta: acc.delta,
            budget: acc.budget,
            noise_multiplier: dp.noise_multiplier,
            min_survivors: self.cfg.min_survivors(),
            mode: if self.secure() {
                "distributed"
            } else {
                "central"
            }
            .into(),
            clip: if self.secure() {
                f64::from(dp.clip)
            } else {
                acc.clip
            },
        })
    }

    pub(super) fn site_epsilon(&self) -> Option<f64> {
        self.site_level_spent().map(|s| s.epsilon)
    }

    pub(super) fn site_level_rdp(&self) -> Option<Vec<f64>> {
        self.site_level
            .as_ref()
            .map(|a| a.accountant.rdp().to_vec())
    }

    /// Why training must stop: one more round at its most expensive (under secure
    /// aggregation, over exactly the fewest survivors it accepts) would take the federation
    /// past its budget.
    pub(super) fn site_level_stop(&self) -> Option<String> {
        let acc = self.site_level.as_ref()?;
        let next = self
            .next_round()
            .and_then(|mech| acc.accountant.epsilon_after(mech, 1, acc.delta).ok())
            .map_or(f64::INFINITY, |s| s.epsilon);
        if next <= acc.budget {
            return None;
        }
        let now = acc
            .accountant
            .epsilon(acc.delta)
            .map_or(f64::NAN, |s| s.epsilon);
        Some(format!(
            "site-level privacy budget: the federation has spent ε = {now:.3} of privacy.site_level.epsilon = {} (δ = {}), and another round would reach {next:.3}",
            acc.budget, acc.delta
        ))
    }
}
