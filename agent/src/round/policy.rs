//! The site's own limits on a round, from `[policy]` in agent.toml: checked against what the
//! coordinator announces before the site trains or shares a key. Pure functions of the
//! policy and the announcement; the counts of *live* peers are the SecAgg+ client's
//! ([`cohort_protocols::secagg::Client::requiring`]), checked at every stage.

use cohort_protocols::model::TrainingConfig;

/// Why this site will not train with the coordinator's training settings: they do not parse or
/// validate (the checks the coordinator's own configuration passes), or the learning rate is
/// outside the site's `policy.learning_rate`.
pub(super) fn training_refusal(
    policy: &crate::config::Policy,
    training_toml: &str,
) -> Option<String> {
    let cfg: TrainingConfig = match toml::from_str(training_toml) {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "the coordinator's training settings do not parse: {}",
                e.message()
            ));
        }
    };
    if let Err(e) = cfg.validate() {
        return Some(format!(
            "the coordinator's training settings are invalid: {e}"
        ));
    }
    if let Some([low, high]) = policy.learning_rate
        && !(low..=high).contains(&cfg.learning_rate)
    {
        return Some(format!(
            "policy: training.learning_rate = {} is outside [{low}, {high}] (policy.learning_rate)",
            cfg.learning_rate
        ));
    }
    None
}

/// Why this site's policy refuses a SecAgg+ round with `setup`, if it does.
pub(super) fn policy_refusal(
    policy: &crate::config::Policy,
    setup: &cohort_protocols::secagg::Setup,
) -> Option<String> {
    let p = &setup.params;
    if let Some([low, high]) = policy.clip
        && !(low..=high).contains(&p.clip)
    {
        return Some(format!(
            "policy: the round's clipping bound {} is outside [{low}, {high}] (policy.clip)",
            p.clip
        ));
    }
    if (setup.participants.len() as u32) < policy.min_sites {
        return Some(format!(
            "policy: the round has {} participants, this site requires at least {} (policy.min_sites)",
            setup.participants.len(),
            policy.min_sites
        ));
    }
    if p.neighbours.saturating_sub(1) < policy.min_live_neighbours {
        return Some(format!(
            "policy: the round's neighbourhood has {} other sites, this site requires at least {} of them live (policy.min_live_neighbours; a federation of fewer sites must lower it)",
            p.neighbours.saturating_sub(1),
            policy.min_live_neighbours
        ));
    }
    if p.neighbours < policy.min_neighbours {
        return Some(format!(
            "policy: the round's neighbourhood is {} sites, this site requires at least {} (policy.min_neighbours)",
            p.neighbours, policy.min_neighbours
        ));
    }
    if p.threshold < policy.min_threshold {
        return Some(format!(
            "policy: the round's threshold is {}, this site requires at least {} (policy.min_threshold)",
            p.threshold, policy.min_threshold
        ));
    }
    if p.tolerated_colluders() < policy.max_colluders {
        return Some(format!(
            "policy: the round's threshold {} of {} neighbours resists {} colluding sites, this site requires {} (policy.max_colluders)",
            p.threshold,
            p.neighbours,
            p.tolerated_colluders(),
            policy.max_colluders
        ));
    }
    if policy.require_consistency_check && !p.consistency_check {
        return Some(
            "policy: the round has no consistency check, this site requires one (policy.require_consistency_check)"
                .into(),
        );
    }
    None
}

/// Why this site's `policy.min_noise_multiplier` refuses a training round with `setup`: the
/// round adds no site-level noise, or less than the site requires.
pub(super) fn noise_refusal(
    policy: &crate::config::Policy,
    setup: &cohort_protocols::secagg::Setup,
) -> Option<String> {
    let min = policy.min_noise_multiplier?;
    let p = &setup.params;
    let Some(noise) = p.noise else {
        return Some(format!(
            "policy: the round adds no site-level noise, this site requires a noise multiplier of at least {min} (policy.min_noise_multiplier)"
        ));
    };
    let z = noise.sigma * f64::from(noise.min_survivors).sqrt() / p.l2_sensitivity();
    (z < min).then(|| {
        format!(
            "policy: the round's noise gives a multiplier of {z:.3} over its {} fewest survivors, this site requires at least {min} (policy.min_noise_multiplier)",
            noise.min_survivors
        )
    })
}

/// How this site prices one noisy input of a round with `params` against its own site-level
/// budget: at the fewest survivors the round accepts (the most the round can cost it).
pub(super) fn site_level_mechanism(
    params: &cohort_protocols::secagg::Params,
) -> Option<cohort_protocols::privacy::Mechanism> {
    params.noise_mechanism(params.noise?.min_survivors)
}

/// Why this site's own site-level budget (`policy.site_level_epsilon`) refuses a training
/// round with `setup`: no noise, or more than the budget has left.
pub(super) fn site_budget_refusal(
    policy: &crate::config::Policy,
    ledger: &crate::ledger::Ledger,
    setup: &cohort_protocols::secagg::Setup,
) -> Option<String> {
    let budget = policy.site_level_epsilon?;
    let Some(m) = site_level_mechanism(&setup.params) else {
        return Some(
            "policy: the round adds no site-level noise, and this site spends its updates only under it (policy.site_level_epsilon)".into(),
        );
    };
    ledger
        .check_site_level(m, budget, policy.site_level_delta)
        .err()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use cohort_protocols::secagg::{Params, RoundId};

    fn setup(n: u32, threshold: u32, consistency_check: bool) -> cohort_protocols::secagg::Setup {
        cohort_protocols::secagg::Setup {
            round: RoundId::new(1, 0),
            params: Params {
                threshold,
                consistency_check,
                ..Params::with_defaults(n, 10)
            },
            graph_seed: [0; 32],
            participants: (0..n).collect(),
            names: (0..n).map(cohort_protocols::secagg::pinned_name).collect(),
        }
    }

    #[test]
    fn the_policy_refuses_small_rounds_low_thresholds_and_no_consistency_check() {
        let policy = Policy {
            min_sites: 4,
            min_threshold: 3,
            min_live_neighbours: 3,
            ..Policy::default()
        };
        let live = policy_refusal(&Policy::default(), &setup(5, 4, true)).unwrap_or_default();
        assert!(
            live.contains("neighbourhood has 4 other sites")
                && live.contains("policy.min_live_neighbours"),
            "{live}"
        );
        assert_eq!(policy_refusal(&policy, &setup(5, 4, true)), None);
        let small = policy_refusal(&policy, &setup(3, 2, true)).unwrap_or_default();
        assert!(
            small.contains("3 participants") && small.contains("policy.min_sites"),
            "{small}"
        );
        let low = policy_refusal(&policy, &setup(5, 2, true)).unwrap_or_default();
        assert!(
            low.contains("threshold is 2") && low.contains("policy.min_threshold"),
            "{low}"
        );
        let narrow = Policy {
            min_neighbours: 6,
            ..policy.clone()
        };
        let few = policy_refusal(&narrow, &setup(5, 4, true)).unwrap_or_default();
        assert!(
            few.contains("neighbourhood is 5") && few.contains("policy.min_neighbours"),
            "{few}"
        );
        // t = 3 of k = 5: a server with one colluding site can split the honest neighbours
        // (2 told "survived", 2 told "dropped") and reach 3 shares of each kind.
        let colluders = policy_refusal(&policy, &setup(5, 3, true)).unwrap_or_default();
        assert!(
            colluders.contains("resists 0 colluding sites")
                && colluders.contains("policy.max_colluders"),
            "{colluders}"
        );
        let trusting = Policy {
            max_colluders: 0,
            ..policy.clone()
        };
        assert_eq!(policy_refusal(&trusting, &setup(5, 3, true)), None);
        let unchecked = policy_refusal(&policy, &setup(5, 4, false)).unwrap_or_default();
        assert!(
            unchecked.contains("policy.require_consistency_check"),
            "{unchecked}"
        );
        let lenient = Policy {
            require_consistency_check: false,
            ..policy
        };
        assert_eq!(policy_refusal(&lenient, &setup(5, 4, false)), None);
    }

    #[test]
    fn a_site_that_requires_site_level_noise_refuses_rounds_with_less() {
        let policy = Policy {
            min_noise_multiplier: Some(0.8),
            ..Policy::default()
        };
        assert_eq!(noise_refusal(&Policy::default(), &setup(5, 4, true)), None);
        let none = noise_refusal(&policy, &setup(5, 4, true)).unwrap_or_default();
        assert!(
            none.contains("no site-level noise") && none.contains("policy.min_noise_multiplier"),
            "{none}"
        );
        let with = |sigma: f64, min_survivors: u32| {
            let mut s = setup(5, 4, true);
            s.params.noise = Some(cohort_protocols::secagg::Noise {
                sigma,
                min_survivors,
            });
            s
        };
        // Δ₂ = 65535/2 + 2√10 ≈ 32774; σ = 15000 over 4 survivors gives 0.915.
        assert_eq!(noise_refusal(&policy, &with(15_000.0, 4)), None);
        // The same σ sized for 2 survivors gives 0.647.
        let weak = noise_refusal(&policy, &with(15_000.0, 2)).unwrap_or_default();
        assert!(
            weak.contains("multiplier of 0.647 over its 2 fewest survivors"),
            "{weak}"
        );
    }
}
