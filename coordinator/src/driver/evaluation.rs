//! Evaluation: every connected site scores the model on its test split.

use super::*;

impl Driver {
    /// Sends the current model to every connected site for evaluation on its test split.
    pub(super) async fn evaluate(
        &mut self,
        round: u64,
    ) -> (Evaluation, BTreeMap<String, SiteResult>) {
        let sites = self.select();
        info!(round, sites = sites.len(), "evaluating the model");
        self.progress
            .set_stage(RunState::Evaluating, round, 0, None);
        let started = Instant::now();
        let bytes = Bytes::from(model::to_bytes(&self.global));
        let start = self.round_start(round, 0, Task::Evaluate, Some(&bytes));
        let sites = self.start_round(&sites, start, Some(&bytes)).await;
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
            let valid = e.round == round
                && e.examples > 0
                && [e.loss, e.accuracy, e.auc].iter().all(|v| v.is_finite())
                && (0.0..=1.0).contains(&e.accuracy)
                && (0.0..=1.0).contains(&e.auc);
            if !valid || !sites.iter().any(|(s, _)| *s == site) {
                continue;
            }
            let examples = self.hub.sites.get(&site).map_or(0, |s| s.examples);
            self.hub.record(&site, |s| {
                s.last_accuracy = Some(e.accuracy);
                s.last_loss = Some(e.loss);
                s.last_auc = Some(e.auc);
                s.test_examples = e.examples;
            });
            results.insert(
                site,
                SiteResult {
                    examples,
                    test_examples: e.examples,
                    accuracy: e.accuracy,
                    loss: e.loss,
                    auc: e.auc,
                },
            );
        }
        self.metrics
            .stage("evaluate", started.elapsed().as_secs_f64());
        if results.is_empty() {
            return (Evaluation::default(), results);
        }
        let n = results.len() as f64;
        let total: f64 = results.values().map(|r| r.test_examples as f64).sum();
        let eval = Evaluation {
            accuracy: results.values().map(|r| r.accuracy).sum::<f64>() / n,
            loss: results
                .values()
                .map(|r| r.loss * r.test_examples as f64)
                .sum::<f64>()
                / total,
            auc: results.values().map(|r| r.auc).sum::<f64>() / n,
        };
        (eval, results)
    }
}
