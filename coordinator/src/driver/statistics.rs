//! Round 0: the federated feature statistics, the initial evaluation and the first commit.

use super::*;

impl Driver {
    /// Round 0 of a new run: the federated feature statistics and the initial model's
    /// evaluation, committed with the initial model.
    pub(super) async fn first_setup(&mut self) -> Result<Setup, DriverError> {
        self.wait_for_sites(0).await?;
        // Without the statistics no round can standardise its inputs: a statistics round that
        // cannot complete ends the run (the sites that sent theirs will not send them again:
        // see the agent's contribution ledger).
        let mut attempts = 0;
        let sum = self
            .with_attempts(0, |d, attempt| {
                attempts = attempt + 1;
                Box::pin(d.stats_round(attempt))
            })
            .await?
            .map_err(|reason| DriverError::RoundFailed {
                round: 0,
                attempts,
                reason,
            })?;
        let (mean, std) = stats::from_sum(&sum, self.stats_columns());
        self.mean = mean;
        self.std = std;
        info!(
            round = 0,
            "feature statistics aggregated from {} rows",
            sum.first().copied().unwrap_or(0)
        );
        let (initial, initial_per_site) = self.evaluate(0).await;
        info!(
            round = 0,
            accuracy = ?initial.accuracy,
            rmse = ?initial.weighted.rmse,
            loss = initial.loss,
            "initial model"
        );
        let setup = Setup {
            mean: self.mean.clone(),
            std: self.std.clone(),
            initial,
            initial_per_site,
        };
        let hash = model::params_sha3_512(&self.global);
        let (m, v) = self.strategy.state();
        self.store.commit_setup(
            &setup,
            &CheckpointRef {
                round: 0,
                params: &self.global,
                sha3_512: &hash,
                signature: &model::sign_model(&self.signing_key, &hash),
                strategy_m: m,
                strategy_v: v,
            },
        )?;
        Ok(setup)
    }

    pub(super) async fn stats_round(&mut self, attempt: u32) -> Result<Vec<u64>, String> {
        let sites = self.select();
        let len = stats::vector_len(self.stats_columns());
        let plain = (!self.secure())
            .then(|| PlainAggregation::open(&self.hub, 0, &sites, len, true, 0, false));
        let (start, context) = self.round_start(0, attempt, Task::Stats, None);
        let sites = self.start_round(&sites, start, None).await;
        let sum = if self.secure() {
            let params = Params {
                modulus: Modulus::Bits64,
                ..self.cfg.secagg.params(sites.len() as u32, (len - 2) as u32)
            };
            let agg = self
                .secagg::<u64>(
                    RoundId::new(0, attempt).with_context(context),
                    &sites,
                    params,
                )
                .await?;
            agg.sum.to_vec()
        } else {
            match self.plain_sum(plain, &sites).await?.sum {
                PlainTotals::Integer(sum) => sum.to_vec(),
                PlainTotals::Weighted(_) => {
                    return Err("statistics must be summed as integers".into());
                }
            }
        };
        // Checked before any site standardises with it: a wrapped or forged sum stops here.
        stats::check_sum(&sum, self.stats_columns())
            .map_err(|e| format!("the statistics sum is refused: {e}"))?;
        Ok(sum)
    }
}
