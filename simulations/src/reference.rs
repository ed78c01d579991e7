//! `cohort-sim run --pooled`: what the federated model is judged against.
//!
//! - **pooled**: the same model trained on every site's training rows as if one site held
//!   them all (the centralised reference a federation tries to match), standardised with the
//!   statistics of the pooled rows — the same numbers the federation's secure statistics round
//!   computes;
//! - **alone**: each site's own model, trained and standardised on its own rows only (what a
//!   hospital gets without the federation).
//!
//! Both run the agent's own training and evaluation code (`cohort_agent::model`) for as many
//! rounds as the federation, with the optimiser restarted each round as an agent's is. The
//! pooled site takes `local_steps × sites` steps per round, so it sees as many batches as the
//! whole federation does. Every model is judged on each site's own test split, the one the
//! federation's sites evaluate on, so the three results compare row for row.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow};
use cohort_agent::data::{Rows, SiteData};
use cohort_agent::model::{self, Objective};
use cohort_coordinator::driver::{Evaluation, SiteResult};
use cohort_protocols::model::{ModelSpec, Task, TrainingConfig, stats};

use crate::run::Reference;

/// One site's data, loaded exactly as its agent loads it.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    pub data: SiteData,
    /// An evaluation-only site: no training rows; its metrics go to `held_out`.
    pub evaluate_only: bool,
}

/// The pooled and the site-alone references.
pub fn references(
    sites: &[Site],
    spec: &ModelSpec,
    cfg: &TrainingConfig,
    seed: u64,
    rounds: u64,
) -> Result<(Reference, Reference)> {
    let task = &sites.first().context("no sites")?.data.task;
    let mut pooled = Rows::default();
    let mut sum = vec![0u64; stats::vector_len(sites[0].data.stats_columns())];
    for s in sites {
        pooled
            .features
            .extend(s.data.train.features.iter().cloned());
        pooled.labels.extend(s.data.train.labels.iter().copied());
        for (a, b) in sum.iter_mut().zip(s.data.stats_vector()) {
            *a = a.wrapping_add(b);
        }
    }
    let trainers = sites.iter().filter(|s| !s.evaluate_only).count().max(1);
    let steps = TrainingConfig {
        local_steps: cfg.local_steps * trainers,
        ..cfg.clone()
    };
    let (mean, std) = stats::from_sum(&sum, sites[0].data.stats_columns());
    let model = fit(spec, task, &pooled, (&mean, &std), &steps, seed, rounds)?;
    let all: Vec<&Site> = sites.iter().collect();
    let pooled_ref = judge(
        &all,
        |_| Ok((model.clone(), mean.clone(), std.clone())),
        spec,
        task,
    )?;

    // A site alone needs training rows: evaluation-only sites have no model of their own.
    let training: Vec<&Site> = sites.iter().filter(|s| !s.evaluate_only).collect();
    let alone = judge(
        &training,
        |s| {
            let columns = s.data.stats_columns();
            let (mean, std) = stats::from_sum(&s.data.stats_vector(), columns);
            let own = fit(spec, task, &s.data.train, (&mean, &std), cfg, seed, rounds)
                .with_context(|| format!("training {} alone", s.name))?;
            Ok((own, mean, std))
        },
        spec,
        task,
    )?;
    Ok((pooled_ref, alone))
}

/// `rounds` rounds of local training from the initial model, as a federation of one.
fn fit(
    spec: &ModelSpec,
    task: &Task,
    rows: &Rows,
    (mean, std): (&[f64], &[f64]),
    cfg: &TrainingConfig,
    seed: u64,
    rounds: u64,
) -> Result<Vec<f32>> {
    let inputs = spec.inputs;
    let x = rows.standardised(&mean[..inputs], &std[..inputs]);
    let objective = Objective::with_stats(task, inputs, mean, std);
    let mut params = spec.init(seed);
    for r in 1..=rounds {
        params = model::train(
            spec,
            &objective,
            &params,
            &x,
            &rows.labels,
            cfg,
            seed ^ r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )
        .map_err(|e| anyhow!("round {r}: {e}"))?;
    }
    Ok(params)
}

/// Every site's test metrics for the model `model_for` gives it, summarised exactly as the
/// coordinator summarises a round ([`Evaluation::of`]): the training sites' mean and pooled
/// (example-weighted) metrics, and the evaluation-only sites' pooled metrics apart.
fn judge(
    sites: &[&Site],
    model_for: impl Fn(&Site) -> Result<(Vec<f32>, Vec<f64>, Vec<f64>)>,
    spec: &ModelSpec,
    task: &Task,
) -> Result<Reference> {
    let mut results = BTreeMap::new();
    for s in sites {
        let (params, mean, std) = model_for(s)?;
        let inputs = spec.inputs;
        let x = s.data.test.standardised(&mean[..inputs], &std[..inputs]);
        let objective = Objective::with_stats(task, inputs, &mean, &std);
        let e = model::evaluate(spec, &objective, &params, &x, &s.data.test.labels)
            .map_err(|e| anyhow!("{}: {e}", s.name))?;
        let metrics = e.metrics();
        results.insert(
            s.name.clone(),
            SiteResult {
                examples: s.data.train.len() as u64,
                test_examples: e.examples as u64,
                accuracy: metrics.accuracy,
                loss: e.loss,
                auc: e.auc,
                metrics,
                tally: e.tally,
                evaluate_only: s.evaluate_only,
            },
        );
    }
    let eval = Evaluation::of(&results);
    Ok(Reference {
        site_mean: eval.site_mean,
        weighted: eval.weighted,
        held_out: eval.held_out.map(|h| h.weighted),
        per_site: results.into_iter().map(|(k, r)| (k, r.metrics)).collect(),
    })
}
