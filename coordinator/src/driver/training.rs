//! A training round: the update aggregated, dequantised and applied to the global model
//! range by range.

use super::*;

/// What the coordinator learns from a secure round besides the update: Σw and the number of
/// clipped values.
struct Unmasked {
    total_weight: u64,
    clipped: u64,
}

impl Driver {
    /// One training round, applied to the global model: returns (total weight, clipped,
    /// sites, dropped).
    pub(super) async fn train_round(
        &mut self,
        round: u64,
        attempt: u32,
    ) -> Result<(u64, u64, usize, usize), String> {
        let sites = self.select();
        let dim = self.spec.num_params();
        let plain = (!self.secure()).then(|| {
            PlainAggregation::open(
                &self.hub,
                round,
                &sites,
                dim + 1,
                false,
                self.cfg.secagg.max_weight,
                self.cfg.aggregation.needs_updates() || self.central_dp(),
            )
        });
        let bytes = Bytes::from(model::to_bytes(&self.global));
        let (start, context) = self.round_start(round, attempt, Task::Train, Some(&bytes));
        let sites = self.start_round(&sites, start, Some(&bytes)).await;
        // The queues to the sites hold views of it until sent; this copy is no longer needed.
        drop(bytes);
        for (s, _) in &sites {
            self.hub.record(s, |st| st.rounds_joined += 1);
        }
        if self.secure() {
            let params = self.cfg.training_params(sites.len() as u32, dim as u32);
            let id = RoundId::new(round, attempt).with_context(context);
            // The sum stays in the round's own word size (a 2^32 sum is half the memory) and
            // in its ranges, dequantised and applied range by range.
            let (a, dropped) = match params.modulus {
                Modulus::Bits32 => {
                    let agg = self.secagg::<u32>(id, &sites, params.clone()).await?;
                    self.spend_site_level(&params, agg.survivors.len())?;
                    (self.apply_masked(&params, &agg)?, agg.dropped)
                }
                Modulus::Bits64 => {
                    let agg = self.secagg::<u64>(id, &sites, params.clone()).await?;
                    self.spend_site_level(&params, agg.survivors.len())?;
                    (self.apply_masked(&params, &agg)?, agg.dropped)
                }
            };
            if a.clipped > 0 {
                warn!(
                    round,
                    clipped = a.clipped,
                    "values were clipped to [-{}, {}]",
                    params.clip,
                    params.clip
                );
            }
            Ok((a.total_weight, a.clipped, sites.len(), dropped))
        } else {
            let Aggregated {
                sum,
                dropped,
                updates,
                ..
            } = self.plain_sum(plain, &sites).await?;
            let PlainTotals::Weighted(sum) = sum else {
                return Err("training updates must be summed as weighted floats".into());
            };
            // sum[0] = Σw, sum[1..] = Σ wΔ
            let total = sum.get(0).unwrap_or(0.0);
            if total <= 0.0 {
                return Err("the surviving sites reported no examples".into());
            }
            if self.central_dp() {
                // Central DP: each update clipped, the mean noised, counted before it is used.
                drop(sum);
                let delta = self.central_mean(&updates)?;
                self.strategy
                    .apply(&mut self.global, &delta)
                    .map_err(|e| e.to_string())?;
            } else if self.cfg.aggregation.needs_updates() {
                // The rule sees every update; the server optimiser applies its result as it
                // would the mean.
                drop(sum);
                let delta =
                    self.cfg.aggregation.aggregate(&updates).map_err(|e| {
                        format!("aggregation ({}): {e}", self.cfg.aggregation.name())
                    })?;
                self.strategy
                    .apply(&mut self.global, &delta)
                    .map_err(|e| e.to_string())?;
            } else {
                self.apply_ranges(&sum, 1, |v| (v / total) as f32)?;
            }
            Ok((total as u64, 0, sites.len(), dropped))
        }
    }

    /// Dequantises the unmasked sum range by range and applies each range of the mean to the
    /// global model, so no second model-sized vector is ever allocated.
    fn apply_masked<W: SinkWord>(
        &mut self,
        params: &Params,
        agg: &Aggregated<Ranges<W>>,
    ) -> Result<Unmasked, String> {
        let sum = &agg.sum;
        let d = Dequantiser::new(
            params,
            sum.len(),
            sum.get(WEIGHT_INDEX),
            agg.survivors.len(),
        )
        .map_err(|e| e.to_string())?;
        // The whole sum is checked before any of it moves the model: a value no sum of valid
        // inputs can hold fails the attempt and leaves the model as it was.
        let mut index = 0;
        let mut sq = 0.0;
        for part in sum.parts() {
            for z in part {
                d.check(index, *z, params.dim)
                    .map_err(|e| format!("the unmasked sum is refused: {e}"))?;
                if index >= VALUES_OFFSET {
                    sq += d.weighted_sum(*z).powi(2);
                }
                index += 1;
            }
        }
        d.check_norm(sq)
            .map_err(|e| format!("the unmasked sum is refused: {e}"))?;
        self.apply_ranges(sum, VALUES_OFFSET, |z| d.mean(z))?;
        Ok(Unmasked {
            total_weight: d.total_weight,
            clipped: sum.get(CLIPPED_INDEX).map_or(0, |c| c.to_u64()),
        })
    }

    /// Applies the mean delta `mean(sum[head..])` to the global model range by range (the
    /// first `head` elements of the sum are totals, not values).
    fn apply_ranges<T: Copy>(
        &mut self,
        sum: &Ranges<T>,
        head: usize,
        mean: impl Fn(T) -> f32,
    ) -> Result<(), String> {
        if sum.len() != self.global.len() + head {
            return Err(format!(
                "the sum has {} elements for a model of {} parameters",
                sum.len(),
                self.global.len()
            ));
        }
        let mut index = 0;
        let mut block = Vec::new();
        for part in sum.parts() {
            let skip = head.saturating_sub(index).min(part.len());
            if skip == part.len() {
                index += part.len();
                continue;
            }
            block.clear();
            block.extend(part[skip..].iter().map(|z| mean(*z)));
            self.strategy
                .apply_range(&mut self.global, index + skip - head, &block)
                .map_err(|e| e.to_string())?;
            index += part.len();
        }
        Ok(())
    }
}
