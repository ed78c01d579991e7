//! The site's privacy budget: `[privacy]` in agent.toml, and the accountant of everything
//! its training has released, on the site's own disk.
//!
//! Every round a site trains with DP-SGD is priced before it starts: if the round would take
//! the site's ε (at its δ) over its budget, the site declines it and says so, whatever the
//! coordinator asks. The spend is written (atomically, like the contribution ledger) before
//! training begins, so a crash after training cannot release an update the accountant never
//! saw, and a restarted agent starts from what it already spent. Spending before the round
//! completes over-counts rounds that are then abandoned; that errs on the patients' side.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cohort_protocols::model::TrainingConfig;
use cohort_protocols::privacy::{Accountant, Mechanism, Spent};
use serde::{Deserialize, Serialize};

use crate::model::DpSgd;

/// `[privacy]`: the site's own DP-SGD settings and budget; the coordinator neither sets nor
/// can lift them.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The most ε this site's rows may ever cost, at `delta`, over all rounds.
    pub epsilon: f64,
    /// δ of the guarantee: well below one over the number of rows.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// σ: the noise's standard deviation in units of `max_grad_norm`. Larger costs accuracy
    /// and buys rounds.
    pub noise_multiplier: f64,
    /// C: each row's gradient is scaled to at most this L2 norm.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
}

fn default_delta() -> f64 {
    1e-5
}
fn default_max_grad_norm() -> f64 {
    1.0
}

/// The file in the state directory.
pub const FILE: &str = "privacy.toml";

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    /// The last round the site priced, so a restarted site can say at once whether it can
    /// afford another like it (absent in files of older agents).
    #[serde(default)]
    last: Option<Priced>,
}

/// One round as the accountant prices it: `steps` releases of the subsampled Gaussian.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Priced {
    sampling_rate: f64,
    noise_multiplier: f64,
    steps: u64,
}

impl Priced {
    fn of(mechanism: Mechanism, steps: u64) -> Self {
        let Mechanism::SubsampledGaussian {
            sampling_rate,
            noise_multiplier,
        } = mechanism;
        Priced {
            sampling_rate,
            noise_multiplier,
            steps,
        }
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::SubsampledGaussian {
            sampling_rate: self.sampling_rate,
            noise_multiplier: self.noise_multiplier,
        }
    }
}

/// What the site tells the coordinator about its spend (`PrivacySpent` on the wire): figures
/// only, never anything about a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyReport {
    /// Spent so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// `privacy.epsilon`.
    pub budget: f64,
    /// ε after one more round like the last one priced; None before any was.
    pub next_epsilon: Option<f64>,
    pub noise_multiplier: f64,
}

impl PrivacyReport {
    /// Another round like the last would go over the budget: the site will decline it.
    pub fn exhausted(&self) -> bool {
        self.next_epsilon.is_some_and(|n| n > self.budget)
    }
}

/// The accountant and the last round it priced, under one lock.
#[derive(Debug, Clone)]
struct Ledger {
    accountant: Accountant,
    last: Option<Priced>,
}

/// The budget, its accountant and where it is kept.
#[derive(Debug)]
pub struct Budget {
    pub settings: PrivacyConfig,
    path: PathBuf,
    /// One round trains at a time; the lock only makes the shared site `Sync`.
    ledger: Mutex<Ledger>,
}

impl Budget {
    /// The budget kept in `dir` (nothing spent when the file does not exist yet).
    pub fn open(dir: &Path, settings: PrivacyConfig) -> Result<Self, String> {
        let path = dir.join(FILE);
        let ledger = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let stored: Stored = toml::from_str(&text)
                    .map_err(|e| format!("{}: {}", path.display(), e.message()))?;
                Ledger {
                    accountant: Accountant::resume(stored.orders, stored.rdp)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                    last: stored.last,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger {
                accountant: Accountant::new(),
                last: None,
            },
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Budget {
            settings,
            path,
            ledger: Mutex::new(ledger),
        })
    }

    /// DP-SGD as this site runs it.
    pub fn dp(&self) -> DpSgd {
        DpSgd {
            noise_multiplier: self.settings.noise_multiplier,
            max_grad_norm: self.settings.max_grad_norm,
        }
    }

    /// What the site has spent so far.
    pub fn spent(&self) -> Result<Spent, String> {
        self.lock()?
            .accountant
            .epsilon(self.settings.delta)
            .map_err(|e| e.to_string())
    }

    /// What the site tells the coordinator: spent so far, and what another round like the
    /// last one it priced would bring it to.
    pub fn report(&self) -> Result<PrivacyReport, String> {
        let ledger = self.lock()?;
        let delta = self.settings.delta;
        let spent = ledger
            .accountant
            .epsilon(delta)
            .map_err(|e| e.to_string())?;
        let next_epsilon = match ledger.last {
            Some(p) => Some(
                ledger
                    .accountant
                    .epsilon_after(p.mechanism(), p.steps, delta)
                    .map_err(|e| e.to_string())?
                    .epsilon,
            ),
            None => None,
        };
        Ok(PrivacyReport {
            epsilon: spent.epsilon,
            delta,
            budget: self.settings.epsilon,
            next_epsilon,
            noise_multiplier: self.settings.noise_multiplier,
        })
    }

    /// Prices a round of training with `cfg` on `rows` rows and, if it stays within the
    /// budget, records it as spent (on disk before this returns); the ε after it. Over the
    /// budget: why not, and nothing is spent.
    pub fn spend(&self, cfg: &TrainingConfig, rows: usize) -> Result<Spent, String> {
        let (mechanism, steps) = self.dp().mechanism(cfg, rows);
        let priced = Priced::of(mechanism, steps);
        let mut ledger = self.lock()?;
        let after = ledger
            .accountant
            .epsilon_after(mechanism, steps, self.settings.delta)
            .map_err(|e| format!("privacy: {e}"))?;
        if after.epsilon > self.settings.epsilon {
            // Remembered (in memory) so the report says this round is out of reach.
            ledger.last = Some(priced);
            let before = ledger
                .accountant
                .epsilon(self.settings.delta)
                .map_err(|e| e.to_string())?;
            return Err(format!(
                "privacy budget: this round ({steps} steps at sampling rate {:.4}, noise multiplier {}) would take ε from {:.3} to {:.3}, over this site's budget of {} at δ = {} (privacy.epsilon)",
                DpSgd::sampling_rate(cfg, rows),
                self.settings.noise_multiplier,
                before.epsilon,
                after.epsilon,
                self.settings.epsilon,
                self.settings.delta
            ));
        }
        let mut next = ledger.clone();
        next.accountant
            .compose(mechanism, steps)
            .map_err(|e| format!("privacy: {e}"))?;
        next.last = Some(priced);
        self.save(&next)?;
        *ledger = next;
        Ok(after)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ledger>, String> {
        self.ledger
            .lock()
            .map_err(|_| "the privacy accountant's lock was poisoned".to_string())
    }

    /// Replaces the file atomically: a temporary file, synced, renamed over the old one, and
    /// the directory synced.
    fn save(&self, ledger: &Ledger) -> Result<(), String> {
        let error = |e: std::io::Error| format!("writing {}: {e}", self.path.display());
        let text = toml::to_string(&Stored {
            orders: ledger.accountant.orders().to_vec(),
            rdp: ledger.accountant.rdp().to_vec(),
            last: ledger.last,
        })
        .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        let tmp = self.path.with_extension("toml.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(error)?;
        file.write_all(text.as_bytes()).map_err(error)?;
        file.sync_all().map_err(error)?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(error)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocols::model::OptimizerKind;

    fn settings(epsilon: f64) -> PrivacyConfig {
        PrivacyConfig {
            epsilon,
            delta: 1e-5,
            noise_multiplier: 2.0,
            max_grad_norm: 1.0,
        }
    }

    fn round() -> TrainingConfig {
        TrainingConfig {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.1,
            batch_size: 10,
            local_steps: 50,
            fedprox_mu: 0.0,
            hidden: Vec::new(),
            custom: None,
            cnn: None,
        }
    }

    /// Rounds are spent until the next would pass the budget; that one is declined with
    /// both ε values and spends nothing; a restarted site starts from what it spent, and
    /// the figures agree with the accountant run by hand.
    #[test]
    fn rounds_spend_the_budget_until_the_next_would_exceed_it_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Budget::open(dir.path(), settings(2.0)).unwrap();
        let fresh = budget.report().unwrap();
        assert_eq!((fresh.epsilon, fresh.next_epsilon), (0.0, None));
        assert!(!fresh.exhausted());
        let mut spent = Vec::new();
        let refusal = loop {
            match budget.spend(&round(), 200) {
                Ok(s) => spent.push(s.epsilon),
                Err(e) => break e,
            }
            assert!(spent.len() < 100, "the budget never ran out");
        };
        assert!(
            spent.len() >= 2 && spent.windows(2).all(|w| w[0] < w[1]),
            "{spent:?}"
        );
        assert!(
            refusal.starts_with("privacy budget: this round"),
            "{refusal}"
        );
        assert!(refusal.contains("budget of 2"), "{refusal}");
        let last = *spent.last().unwrap();
        assert_eq!(
            budget.spent().unwrap().epsilon,
            last,
            "a refusal spends nothing"
        );

        let mut by_hand = Accountant::new();
        let (m, steps) = budget.dp().mechanism(&round(), 200);
        by_hand.compose(m, steps * spent.len() as u64).unwrap();
        assert!((by_hand.epsilon(1e-5).unwrap().epsilon - last).abs() < 1e-9);

        // What the coordinator is told: the spend, and that another such round is out of
        // reach — in this process and, from the file, in the next one.
        let report = budget.report().unwrap();
        assert_eq!(report.epsilon, last);
        assert_eq!(report.budget, 2.0);
        assert!(
            report.next_epsilon.unwrap() > 2.0 && report.exhausted(),
            "{report:?}"
        );
        drop(budget);
        let again = Budget::open(dir.path(), settings(2.0)).unwrap();
        assert_eq!(again.spent().unwrap().epsilon, last);
        assert!(again.report().unwrap().exhausted());
        assert!(again.spend(&round(), 200).is_err());
        // A larger budget set later goes on from the same spend.
        let larger = Budget::open(dir.path(), settings(4.0)).unwrap();
        assert!(!larger.report().unwrap().exhausted());
        assert!(larger.spend(&round(), 200).unwrap().epsilon > last);
    }

    #[test]
    fn a_damaged_file_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "orders = [0.5]\nrdp = [0.0]\n").unwrap();
        let e = Budget::open(dir.path(), settings(1.0)).unwrap_err();
        assert!(e.contains(FILE), "{e}");
    }
}
