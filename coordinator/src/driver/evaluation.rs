//! Evaluation: every connected site scores the model on its test split.

use cohort_protocols::model::metrics::{Residuals, Tally};

use crate::status::Rollout;

use super::*;

impl Driver {
    /// Sends the current model to every connected site for evaluation on its test split.
    pub(super) async fn evaluate(
        &mut self,
        round: u64,
    ) -> (Evaluation, BTreeMap<String, SiteResult>) {
        let sites = self.select_for_evaluation();
        info!(round, sites = sites.len(), "evaluating the model");
        self.progress
            .set_stage(RunState::Evaluating, round, 0, None);
        let started = Instant::now();
        let bytes = Bytes::from(model::to_bytes(&self.global));
        let (start, _) = self.round_start(round, 0, Task::Evaluate, Some(&bytes));
        let sending = Instant::now();
        let sites = self.start_round(&sites, start, Some(&bytes)).await;
        let sent_seconds = sending.elapsed().as_secs_f64();
        let deadline = tokio::time::Instant::now() + self.stage_timeout();
        let mut results: BTreeMap<String, SiteResult> = BTreeMap::new();
        let sessions = Sessions::of(&self.hub, &sites);
        let mut gone: HashSet<String> = sessions.gone().into_iter().collect();
        let mut waiting = WaitingLog::new();
        while results.len() + gone.iter().filter(|s| !results.contains_key(*s)).count()
            < sites.len()
        {
            let tick = deadline.min(tokio::time::Instant::now() + waiting.until_next());
            let msg = match tokio::time::timeout_at(tick, self.inbox.recv()).await {
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {
                    waiting.tick(round, "evaluate", || {
                        sites
                            .iter()
                            .filter(|(s, _)| !results.contains_key(s) && !gone.contains(s))
                            .map(|(s, _)| s.clone())
                            .collect()
                    });
                    continue;
                }
                Ok(None) => break,
                Ok(Some(m)) => m,
            };
            if let Inbound::Disconnected { .. } = msg {
                gone.extend(sessions.gone());
                continue;
            }
            let (site, e) = match msg {
                Inbound::Message {
                    site,
                    msg:
                        AgentMessage {
                            kind: Some(agent_message::Kind::Eval(e)),
                        },
                    ..
                } => (site, e),
                // A site that declines (it could not verify the model) will not report.
                Inbound::Message {
                    site,
                    msg:
                        AgentMessage {
                            kind: Some(agent_message::Kind::Decline(d)),
                        },
                    ..
                } if d.round == round && sites.iter().any(|(s, _)| *s == site) => {
                    warn!(round, %site, reason = %d.reason, "site declined to evaluate the model");
                    self.hub
                        .record(&site, |s| s.last_decline = Some((round, d.reason.clone())));
                    gone.insert(site);
                    continue;
                }
                _ => continue,
            };
            if e.round != round || !sites.iter().any(|(s, _)| *s == site) {
                continue;
            }
            let tally = Tally {
                confusion: e.confusion.clone(),
                residuals: e.residuals.map(|r| Residuals {
                    n: r.n,
                    sse: r.sse,
                    sae: r.sae,
                    sum_y: r.sum_y,
                    sum_y2: r.sum_y2,
                }),
            };
            let checked = tally
                .check(self.cfg.schema.task.classes(), e.examples)
                .and_then(|()| {
                    let ok = e.examples > 0
                        && e.loss.is_finite()
                        && e.auc.is_none_or(|a| (0.0..=1.0).contains(&a));
                    if ok {
                        Ok(())
                    } else {
                        Err(format!(
                            "loss {} or AUC {:?} out of range, or no test examples",
                            e.loss, e.auc
                        ))
                    }
                });
            if let Err(reason) = checked {
                warn!(round, %site, %reason, "refusing the site's evaluation report");
                self.hub.record(&site, |s| {
                    s.last_rejection = Some((round, format!("evaluation report: {reason}")));
                });
                gone.insert(site);
                continue;
            }
            let metrics = tally.metrics(e.auc);
            let (examples, evaluate_only) = self
                .hub
                .sites
                .get(&site)
                .map_or((0, false), |s| (s.examples, s.evaluate_only));
            self.hub.record(&site, |s| {
                s.last_accuracy = metrics.accuracy;
                s.last_loss = Some(e.loss);
                s.last_auc = e.auc;
                s.last_rmse = metrics.rmse;
                s.test_examples = e.examples;
            });
            results.insert(
                site,
                SiteResult {
                    examples,
                    test_examples: e.examples,
                    accuracy: metrics.accuracy,
                    loss: e.loss,
                    auc: e.auc,
                    metrics,
                    tally,
                    evaluate_only,
                },
            );
        }
        self.metrics
            .stage("evaluate", started.elapsed().as_secs_f64());
        let rollout = Rollout {
            round,
            model_bytes: bytes.len() as u64,
            sites: sites.len(),
            acknowledged: results.len(),
            sent_seconds,
            seconds: sending.elapsed().as_secs_f64(),
        };
        info!(
            round,
            sites = rollout.sites,
            acknowledged = rollout.acknowledged,
            sent_seconds = rollout.sent_seconds,
            seconds = rollout.seconds,
            "model rolled out"
        );
        self.progress.rolled_out(rollout);
        let eval = Evaluation::of(&results);
        (eval, results)
    }
}
