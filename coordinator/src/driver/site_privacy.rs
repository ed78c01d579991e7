//! Site-level DP under secure aggregation (`[privacy.site_level]`): the federation's account
//! of every noisy sum the coordinator unmasked, and the stop before the budget is passed.
//!
//! The sites add the noise (the set-up tells them σ; see `CoordinatorConfig::training_params`)
//! and refuse to unmask a sum over fewer survivors than it was sized for, so the
//! coordinator cannot spend more than it accounts here; what it can get wrong is only its own
//! report. It therefore counts a sum when it is unmasked, before the sum is checked or used:
//! an attempt whose sum is then refused still released it. A redo of a round over the same
//! survivors resends the same noisy inputs (the sites' ledger allows nothing else) and
//! releases nothing new, but is counted again — the account errs on the side of spending.

use cohort_protocols::privacy::{Accountant, DEFAULT_ORDERS, distributed_discrete_gaussian};
use cohort_protocols::secagg::Params;
use serde::{Deserialize, Serialize};

use super::*;

/// The running account, resumed from the last committed round's curve.
#[derive(Debug, Clone)]
pub(super) struct SiteLevel {
    accountant: Accountant,
    delta: f64,
    budget: f64,
}

/// Site-level DP as the status API and the run summary show it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
}

impl SiteLevel {
    pub(super) fn new(cfg: &CoordinatorConfig) -> Option<Self> {
        let dp = cfg.privacy.site_level.as_ref()?;
        Some(SiteLevel {
            accountant: Accountant::new(),
            delta: dp.delta,
            budget: dp.epsilon,
        })
    }
}

impl Driver {
    /// Picks up the account from the last committed round, if it carried one.
    pub(super) fn resume_site_level(&mut self, last: Option<&RoundRecord>) -> Result<(), String> {
        let (Some(acc), Some(rdp)) = (
            self.site_level.as_mut(),
            last.and_then(|r| r.site_level_rdp.clone()),
        ) else {
            return Ok(());
        };
        acc.accountant = Accountant::resume(DEFAULT_ORDERS.to_vec(), rdp)
            .map_err(|e| format!("the site-level privacy account of the last round: {e}"))?;
        self.publish_site_level();
        Ok(())
    }

    /// Counts one unmasked noisy sum over `survivors` sites (called before the sum is used).
    pub(super) fn spend_site_level(
        &mut self,
        params: &Params,
        survivors: usize,
    ) -> Result<(), String> {
        let (Some(acc), Some(noise)) = (self.site_level.as_mut(), params.noise) else {
            return Ok(());
        };
        let mechanism = distributed_discrete_gaussian(
            survivors as u32,
            noise.sigma,
            params.l2_sensitivity(),
            u64::from(params.dim),
        )
        .map_err(|e| format!("site-level privacy: {e}"))?;
        acc.accountant
            .compose(mechanism, 1)
            .map_err(|e| format!("site-level privacy: {e}"))?;
        self.publish_site_level();
        Ok(())
    }

    fn publish_site_level(&self) {
        if let Some(s) = self.site_level_spent() {
            self.progress.site_level(s);
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

    /// Why training must stop: one more round, even over exactly the fewest survivors it
    /// accepts (the most a round can cost), would take the federation past its budget.
    pub(super) fn site_level_stop(&self) -> Option<String> {
        let acc = self.site_level.as_ref()?;
        let m = self.cfg.min_survivors();
        let p = self
            .cfg
            .training_params(self.cfg.rounds.min_sites, self.spec.num_params() as u32);
        let noise = p.noise?;
        let next =
            distributed_discrete_gaussian(m, noise.sigma, p.l2_sensitivity(), u64::from(p.dim))
                .and_then(|mech| acc.accountant.epsilon_after(mech, 1, acc.delta))
                .map(|s| s.epsilon)
                .unwrap_or(f64::INFINITY);
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
