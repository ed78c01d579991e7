//! The site's contribution ledger: what this site has already given the federation, kept on
//! the site's own disk so that no coordinator can ask for it twice.
//!
//! Secure aggregation hides one site's input inside a sum, but two sums over sets that differ
//! by one site give that site's input away: run a round's attempt with every site, then
//! another without the victim, and subtract. Every attempt is honest on its own, so nothing
//! inside the protocol can see it; only the sites can, by remembering what they sent. So a
//! site writes down, durably and before the input leaves, each masked input it sends, and
//! refuses:
//!
//! - any attempt of a round up to the last one it sent an input for (a round is at most one
//!   contribution, whatever its attempt number — and a coordinator that restarted cannot
//!   "redo" a round either);
//! - a second statistics contribution from the same data (the statistics vector's digest);
//! - more training updates from one model than `policy.updates_per_model` allows, when the
//!   site sets it;
//! - evaluating a model twice, a round older than the last it evaluated, or more models per
//!   round than `policy.max_evaluations_per_round`: evaluation reports are counts in clear.
//!
//! Recorded at the masked input, not at the unmasking shares: a survivor's input can be
//! unmasked with its neighbours' shares alone, so a site the coordinator cuts off after its
//! input arrived has contributed even though it never revealed a share.
//!
//! The file is replaced atomically (write a temporary file, sync it, rename it over the old
//! one, sync the directory), so a crash leaves the old ledger or the new one, never half of
//! either. A ledger that cannot be read or written stops the agent: contributing without a
//! record is exactly what the ledger exists to prevent.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use cohort_protocols::privacy::{Accountant, DEFAULT_ORDERS, Mechanism};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use thiserror::Error;

/// The file name inside the site's state directory.
pub const FILE: &str = "ledger.toml";

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error(
        "the contribution ledger {path} cannot be read: {error} (it records what this site already sent; restore it, or delete it only if this site's data changed since)"
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "the contribution ledger {path} is damaged: {error} (it records what this site already sent; restore it, or delete it only if this site's data changed since)"
    )]
    Corrupt { path: PathBuf, error: String },
    #[error(
        "the contribution ledger {path} cannot be written: {error} (set state_dir in agent.toml to a writable directory that survives restarts)"
    )]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The last round this site sent a masked input for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    pub round: u64,
    pub attempt: u32,
    /// What the input was computed from ([`Input::label`]).
    #[serde(default)]
    pub input: String,
    /// The survivors (names, sorted) this site accepted for that attempt before it revealed
    /// any share; absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survivors: Option<Vec<String>>,
}

/// What the ledger allows for a round: a first contribution, or the same input again over
/// exactly the survivors it went to before (`redo_of`), which tells the coordinator nothing
/// it could not already know. The redo is how a round survives a coordinator crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permit {
    pub redo_of: Option<Vec<String>>,
    /// A DP site's fresh release ([`Ledger::check_release`]): recorded as a contribution of
    /// its own, never as a redo.
    pub fresh: bool,
}

/// What a contribution was computed from, as the ledger names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A statistics vector, named by its digest: the data version.
    Statistics(String),
    /// A training update, named by its model.
    Update(String),
}

impl Input {
    pub fn statistics(vector: &[u64]) -> Self {
        Input::Statistics(data_version(vector))
    }

    pub fn update(model_sha3_512: &[u8]) -> Self {
        Input::Update(model_key(model_sha3_512))
    }

    /// How the ledger writes it.
    pub fn label(&self) -> String {
        match self {
            Input::Statistics(v) => format!("statistics {v}"),
            Input::Update(m) => format!("update {m}"),
        }
    }
}

/// Why the ledger refuses a round; `contributed` is set when the reason is an earlier
/// contribution to this round or a later one (the coordinator then gives the round up for
/// this site).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub contributed: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entries {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    contributed: Option<Contribution>,
    /// Data versions (hex SHA3-256 of the statistics vector) already sent as statistics.
    #[serde(default)]
    statistics: BTreeSet<String>,
    /// Training updates sent per model (hex of the first 16 bytes of its SHA3-512).
    #[serde(default)]
    updates: BTreeMap<String, u32>,
    /// Models evaluated (as above).
    #[serde(default)]
    evaluated: BTreeSet<String>,
    /// The last round an evaluation was answered in, and how many in it.
    #[serde(default)]
    evaluation_round: u64,
    #[serde(default)]
    evaluations_in_round: u32,
    /// The last evaluation reported: (round, model, the encoded report), answered again as
    /// it was when the same round asks for the same model (a coordinator that restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_report: Option<(u64, String, String)>,
    /// Site-level DP (`policy.site_level_epsilon`): the RDP curve, at the accountant's
    /// default orders, of every noisy masked input this site sent, each priced at the fewest
    /// survivors its round accepted; empty before the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    site_level_rdp: Vec<f64>,
}

/// What the ledger allows for an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evaluation {
    /// Evaluate the model and report.
    New,
    /// The same round asked for the same model again: send this report (encoded) again,
    /// without evaluating. It tells the coordinator nothing it was not told.
    Replay(Vec<u8>),
}

/// The ledger of one site. Owned by the agent's connection loop: one session at a time
/// consults and updates it, so it needs no lock.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    entries: Entries,
}

/// 128 bits of the model's hash name it in the ledger: a model is only ever compared with
/// the ones this site saw, and 16 bytes keep a ledger of a million rounds small.
fn model_key(sha3_512: &[u8]) -> String {
    cohort_protocols::hex::encode(&sha3_512[..sha3_512.len().min(16)])
}

fn data_version(stats: &[u64]) -> String {
    let mut h = Sha3_256::new();
    for v in stats {
        h.update(v.to_le_bytes());
    }
    cohort_protocols::hex::encode(&h.finalize())
}

impl Ledger {
    /// Opens the ledger in `dir`, creating an empty one (and so proving the directory
    /// writable before the site takes part in anything).
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        let path = dir.join(FILE);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| LedgerError::Corrupt {
                path: path.clone(),
                error: e.message().to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ledger = Ledger {
                    path,
                    entries: Entries::default(),
                };
                ledger.save(&ledger.entries)?;
                return Ok(ledger);
            }
            Err(error) => return Err(LedgerError::Read { path, error }),
        };
        Ok(Ledger { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last round this site sent a masked input for.
    pub fn contributed(&self) -> Option<&Contribution> {
        self.entries.contributed.as_ref()
    }

    fn already(c: &Contribution, why: &str) -> Refusal {
        Refusal {
            reason: format!(
                "ledger: this site already sent its input for round {} (attempt {}){why}; it takes part in no other attempt of that round and in no earlier round, as two sums over different sites would give a site's input away",
                c.round, c.attempt
            ),
            contributed: Some(c.round),
        }
    }

    /// Whether this site may contribute to `round` at all, before it knows its input: not to
    /// a round before the last it sent an input for, and to that round only as a redo (the
    /// survivors it accepted then are known, and must be the same again).
    pub fn check_round(&self, round: u64) -> Result<Permit, Refusal> {
        match &self.entries.contributed {
            Some(c) if round < c.round => Err(Self::already(c, "")),
            Some(c) if round == c.round => match &c.survivors {
                Some(survivors) => Ok(Permit {
                    redo_of: Some(survivors.clone()),
                    fresh: false,
                }),
                None => Err(Self::already(
                    c,
                    " and never learnt which sites survived it",
                )),
            },
            _ => Ok(Permit::default()),
        }
    }

    /// Whether `input` may go into `round`: [`Ledger::check_round`] (a redo must be of the
    /// same input), then the statistics and per-model limits.
    pub fn check(
        &self,
        round: u64,
        input: &Input,
        updates_per_model: Option<u32>,
    ) -> Result<Permit, Refusal> {
        let permit = self.check_round(round)?;
        if permit.redo_of.is_some() {
            return match &self.entries.contributed {
                Some(c) if c.input == input.label() => Ok(permit),
                Some(c) => Err(Self::already(c, " from another input")),
                None => Ok(Permit::default()),
            };
        }
        match input {
            Input::Statistics(version) if self.entries.statistics.contains(version) => {
                Err(Refusal {
                    reason: "ledger: this site already sent the statistics of these data to a federation; the same statistics twice would let two sums be differenced".into(),
                    contributed: None,
                })
            }
            Input::Update(model) => self.model_limit(model, updates_per_model).map(|()| permit),
            Input::Statistics(_) => Ok(permit),
        }
    }

    /// `policy.updates_per_model`: at most that many updates computed from `model`.
    fn model_limit(&self, model: &str, updates_per_model: Option<u32>) -> Result<(), Refusal> {
        let sent = self.entries.updates.get(model).copied().unwrap_or(0);
        match updates_per_model {
            Some(limit) if sent >= limit => Err(Refusal {
                reason: format!(
                    "ledger: this site already sent {sent} update(s) computed from this model (policy.updates_per_model = {limit})"
                ),
                contributed: None,
            }),
            _ => Ok(()),
        }
    }

    /// Whether a site that trains with DP-SGD may send a training update from `input`'s
    /// model in `round`. Every update it trains is a fresh release that its own accountant
    /// prices before training (DP-SGD draws new noise each time), so a later attempt of a
    /// round it already sent an input for is allowed, over any survivors: the difference of
    /// two sums then holds two releases that were each paid for, where [`Ledger::check`]
    /// would allow only a redo of the same input. Rounds before the last it sent for stay
    /// refused, and `updates_per_model` still binds.
    pub fn check_release(
        &self,
        round: u64,
        input: &Input,
        updates_per_model: Option<u32>,
    ) -> Result<Permit, Refusal> {
        if let Some(c) = &self.entries.contributed
            && round < c.round
        {
            return Err(Self::already(c, ""));
        }
        if let Input::Update(model) = input {
            self.model_limit(model, updates_per_model)?;
            return Ok(Permit {
                redo_of: None,
                fresh: true,
            });
        }
        self.check(round, input, updates_per_model)
    }

    /// Records that this site is about to send its masked input for (`round`, `attempt`),
    /// durably: call before the input leaves, and send nothing if it fails. A redo of the
    /// last contribution (same round, same input) counts no second time.
    pub fn record(&mut self, round: u64, attempt: u32, input: &Input) -> Result<(), LedgerError> {
        self.record_as(round, attempt, input, false)
    }

    /// As [`Ledger::record`] for a fresh release ([`Ledger::check_release`]): a contribution
    /// of its own, with no survivors yet, counted against `updates_per_model`.
    pub fn record_release(
        &mut self,
        round: u64,
        attempt: u32,
        input: &Input,
    ) -> Result<(), LedgerError> {
        self.record_as(round, attempt, input, true)
    }

    fn record_as(
        &mut self,
        round: u64,
        attempt: u32,
        input: &Input,
        fresh: bool,
    ) -> Result<(), LedgerError> {
        let mut next = self.entries.clone();
        let label = input.label();
        let redone = next
            .contributed
            .as_ref()
            .filter(|c| !fresh && c.round == round && c.input == label);
        let redo = redone.is_some();
        // A redo keeps the survivors of the attempt it redoes: every later attempt of the
        // round is still bound to them, even when this one is refused before it learns its
        // own (a redo can only ever be answered over the same survivors anyway).
        let survivors = redone.and_then(|c| c.survivors.clone());
        next.contributed = Some(Contribution {
            round,
            attempt,
            input: label,
            survivors,
        });
        if !redo {
            match input {
                Input::Statistics(version) => {
                    next.statistics.insert(version.clone());
                }
                Input::Update(model) => {
                    *next.updates.entry(model.clone()).or_insert(0) += 1;
                }
            }
        }
        self.save(&next)?;
        self.entries = next;
        Ok(())
    }

    /// Records the survivors this site accepts for (`round`, `attempt`), durably, before it
    /// signs them or reveals a share: from then on a redo of the round must have exactly
    /// these. Nothing is recorded for an attempt that is not the last contribution.
    pub fn record_survivors(
        &mut self,
        round: u64,
        attempt: u32,
        mut survivors: Vec<String>,
    ) -> Result<(), LedgerError> {
        survivors.sort();
        let mut next = self.entries.clone();
        match next.contributed.as_mut() {
            Some(c) if c.round == round && c.attempt == attempt => {
                if c.survivors.as_ref() == Some(&survivors) {
                    return Ok(());
                }
                c.survivors = Some(survivors);
            }
            _ => return Ok(()),
        }
        self.save(&next)?;
        self.entries = next;
        Ok(())
    }

    /// Whether this site answers an evaluation of `model` in `round`: each model once, in
    /// round order, at most `max_per_round` per round.
    pub fn check_evaluation(
        &self,
        round: u64,
        model_sha3_512: &[u8],
        max_per_round: u32,
    ) -> Result<Evaluation, String> {
        let e = &self.entries;
        let model = model_key(model_sha3_512);
        if let Some((r, m, report)) = &e.last_report
            && *r == round
            && *m == model
            && let Some(bytes) = cohort_protocols::hex::decode(report)
        {
            return Ok(Evaluation::Replay(bytes));
        }
        if e.evaluated.contains(&model) {
            return Err("ledger: this site already evaluated this model; each model is evaluated once, as repeated evaluations are queries on the site's test rows".into());
        }
        if e.evaluations_in_round > 0 && round < e.evaluation_round {
            return Err(format!(
                "ledger: evaluation of round {round} after round {}: this site evaluates models in the order the run produces them",
                e.evaluation_round
            ));
        }
        if round == e.evaluation_round && e.evaluations_in_round >= max_per_round {
            return Err(format!(
                "ledger: this site already evaluated {} model(s) in round {round} (policy.max_evaluations_per_round = {max_per_round})",
                e.evaluations_in_round
            ));
        }
        Ok(Evaluation::New)
    }

    /// Records an evaluation about to be reported (`report`, encoded), durably.
    pub fn record_evaluation(
        &mut self,
        round: u64,
        model_sha3_512: &[u8],
        report: &[u8],
    ) -> Result<(), LedgerError> {
        let mut next = self.entries.clone();
        let model = model_key(model_sha3_512);
        next.evaluated.insert(model.clone());
        next.last_report = Some((round, model, cohort_protocols::hex::encode(report)));
        if round == next.evaluation_round && next.evaluations_in_round > 0 {
            next.evaluations_in_round += 1;
        } else {
            next.evaluation_round = round;
            next.evaluations_in_round = 1;
        }
        self.save(&next)?;
        self.entries = next;
        Ok(())
    }

    fn site_accountant(&self) -> Result<Accountant, String> {
        if self.entries.site_level_rdp.is_empty() {
            return Ok(Accountant::new());
        }
        Accountant::resume(DEFAULT_ORDERS.to_vec(), self.entries.site_level_rdp.clone())
            .map_err(|e| format!("ledger {}: site_level_rdp: {e}", self.path.display()))
    }

    /// The site-level ε this site's noisy inputs have spent, at `delta`.
    pub fn site_level_epsilon(&self, delta: f64) -> Result<f64, String> {
        Ok(self
            .site_accountant()?
            .epsilon(delta)
            .map_err(|e| e.to_string())?
            .epsilon)
    }

    /// Whether one more noisy input priced as `mechanism` keeps this site within its own
    /// site-level `budget` (`policy.site_level_epsilon`), whatever the coordinator's account
    /// says: Ok(ε after it), or why not, with the figures.
    pub fn check_site_level(
        &self,
        mechanism: Mechanism,
        budget: f64,
        delta: f64,
    ) -> Result<f64, String> {
        let acc = self.site_accountant()?;
        let before = acc.epsilon(delta).map_err(|e| e.to_string())?.epsilon;
        let after = acc
            .epsilon_after(mechanism, 1, delta)
            .map_err(|e| e.to_string())?
            .epsilon;
        if after > budget {
            return Err(format!(
                "site-level privacy budget: this round would take this site's ε from {before:.3} to {after:.3}, over its budget of {budget} at δ = {delta} (policy.site_level_epsilon)"
            ));
        }
        Ok(after)
    }

    /// Counts one noisy input, durably: called before the input leaves (a crash after this
    /// over-counts an input never sent, which errs on the site's side).
    pub fn spend_site_level(&mut self, mechanism: Mechanism) -> Result<(), LedgerError> {
        let mut acc = self
            .site_accountant()
            .map_err(|error| LedgerError::Corrupt {
                path: self.path.clone(),
                error,
            })?;
        acc.compose(mechanism, 1)
            .map_err(|e| LedgerError::Corrupt {
                path: self.path.clone(),
                error: e.to_string(),
            })?;
        let mut next = self.entries.clone();
        next.site_level_rdp = acc.rdp().to_vec();
        self.save(&next)?;
        self.entries = next;
        Ok(())
    }

    /// Replaces the file atomically with `entries`.
    fn save(&self, entries: &Entries) -> Result<(), LedgerError> {
        let error = |error| LedgerError::Write {
            path: self.path.clone(),
            error,
        };
        let text =
            toml::to_string(entries).map_err(|e| error(std::io::Error::other(e.to_string())))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = self.path.with_extension("toml.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(error)?;
        file.write_all(text.as_bytes()).map_err(error)?;
        file.sync_all().map_err(error)?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(error)?;
        // The rename is durable only once the directory is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: [u8; 64] = [7; 64];
    const OTHER: [u8; 64] = [8; 64];

    /// A redo refused over other survivors (recorded before the refusal, as its input left)
    /// must not erase the survivors it is bound to: a later attempt over them is still a redo.
    #[test]
    fn a_redo_keeps_the_survivors_of_the_attempt_it_redoes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let update = Input::update(&MODEL);
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        ledger.record(5, 0, &update).unwrap();
        ledger.record_survivors(5, 0, four.clone()).unwrap();
        ledger.record(5, 1, &update).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.contributed().map(|c| c.attempt), Some(1));
        assert_eq!(
            ledger.check(5, &update, None),
            Ok(Permit {
                redo_of: Some(four),
                fresh: false,
            })
        );
    }

    /// A DP site: another attempt of a round it sent for is a fresh release, allowed over
    /// any survivors and recorded as a contribution of its own; earlier rounds and the
    /// per-model limit still refuse. A site without DP gets only the redo.
    #[test]
    fn a_private_site_may_send_a_fresh_release_in_a_later_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let update = Input::update(&[3u8; 64]);
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        ledger.record(5, 0, &update).unwrap();
        ledger.record_survivors(5, 0, three.clone()).unwrap();
        assert_eq!(ledger.check(5, &update, None).unwrap().redo_of, Some(three));
        let fresh = ledger.check_release(5, &update, None).unwrap();
        assert_eq!(
            fresh,
            Permit {
                redo_of: None,
                fresh: true
            }
        );
        ledger.record_release(5, 1, &update).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let c = ledger.contributed().unwrap();
        assert_eq!((c.round, c.attempt, c.survivors.clone()), (5, 1, None));
        // Two updates from this model are on record now.
        let limit = ledger.check_release(5, &update, Some(2)).unwrap_err();
        assert!(
            limit.reason.contains("already sent 2 update(s)"),
            "{}",
            limit.reason
        );
        assert!(ledger.check_release(5, &update, Some(3)).is_ok());
        assert!(ledger.check_release(4, &update, None).is_err());
        // Statistics are not a DP release: the ordinary rules.
        assert!(
            ledger
                .check_release(5, &Input::statistics(&[1, 2]), None)
                .is_err()
        );
    }

    #[test]
    fn a_contribution_closes_its_round_and_every_earlier_one_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let update = Input::update(&MODEL);
        assert_eq!(ledger.check(3, &update, None), Ok(Permit::default()));
        ledger.record(3, 0, &update).unwrap();
        // The agent restarts: the record is on disk.
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let other = Input::update(&OTHER);
        for round in [3, 2, 0] {
            let refusal = ledger.check(round, &other, None).unwrap_err();
            assert_eq!(refusal.contributed, Some(3));
            assert!(
                refusal.reason.contains("round 3 (attempt 0)"),
                "{refusal:?}"
            );
        }
        // Round 3 again, even with the same input: the site never learnt the survivors.
        assert!(ledger.check(3, &update, None).is_err());
        assert_eq!(ledger.check(4, &other, None), Ok(Permit::default()));
        // Once it accepted the survivors, a redo of round 3 is allowed with the same input,
        // and only over those survivors; an earlier round still is not.
        ledger
            .record_survivors(3, 0, vec!["va".into(), "hungary".into()])
            .unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let redo = ledger.check(3, &update, Some(1)).unwrap();
        assert_eq!(redo.redo_of, Some(vec!["hungary".into(), "va".into()]));
        let refused = ledger.check(3, &other, None).unwrap_err();
        assert!(refused.reason.contains("from another input"), "{refused:?}");
        assert!(ledger.check(2, &update, None).is_err());
    }

    #[test]
    fn statistics_go_once_per_data_version_and_updates_per_model_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        ledger.record(0, 1, &Input::statistics(&[1, 2, 3])).unwrap();
        let again = ledger.check(5, &Input::statistics(&[1, 2, 3]), None);
        assert!(again.unwrap_err().reason.contains("statistics"));
        assert!(
            ledger
                .check(5, &Input::statistics(&[1, 2, 4]), None)
                .is_ok()
        );
        let update = Input::update(&MODEL);
        ledger.record(1, 0, &update).unwrap();
        assert!(ledger.check(2, &update, None).is_ok(), "no limit set");
        let refused = ledger.check(2, &update, Some(1)).unwrap_err();
        assert!(refused.reason.contains("policy.updates_per_model = 1"));
        assert_eq!(refused.contributed, None);
        assert!(ledger.check(2, &update, Some(2)).is_ok());
        // A redo of round 1 (same survivors) is not a second update from the model.
        ledger.record_survivors(1, 0, vec!["a".into()]).unwrap();
        ledger.record(1, 1, &update).unwrap();
        assert!(ledger.check(2, &update, Some(2)).is_ok());
    }

    #[test]
    fn a_model_is_evaluated_once_in_round_order_and_within_the_per_round_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.check_evaluation(0, &MODEL, 1), Ok(Evaluation::New));
        ledger.record_evaluation(0, &MODEL, b"report").unwrap();
        let ledger2 = Ledger::open(dir.path()).unwrap();
        assert!(
            ledger2
                .check_evaluation(1, &MODEL, 1)
                .unwrap_err()
                .contains("already evaluated this model")
        );
        assert!(
            ledger2
                .check_evaluation(0, &OTHER, 1)
                .unwrap_err()
                .contains("policy.max_evaluations_per_round = 1")
        );
        let mut ledger = ledger2;
        ledger.record_evaluation(4, &OTHER, b"other").unwrap();
        assert!(
            ledger
                .check_evaluation(3, &[9; 64], 5)
                .unwrap_err()
                .contains("after round 4")
        );
        assert_eq!(ledger.check_evaluation(4, &[9; 64], 2), Ok(Evaluation::New));
        // The same round asking for the same model again gets the same report, unevaluated.
        assert_eq!(
            ledger.check_evaluation(4, &OTHER, 1),
            Ok(Evaluation::Replay(b"other".to_vec()))
        );
    }

    #[test]
    fn a_damaged_ledger_stops_the_agent_instead_of_starting_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "contributed = 3 [").unwrap();
        let e = Ledger::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is damaged") && e.contains(FILE), "{e}");
        let missing = dir.path().join("no/such/dir");
        let e = Ledger::open(&missing).unwrap_err().to_string();
        assert!(
            e.contains("cannot be written") && e.contains("state_dir"),
            "{e}"
        );
    }

    /// The site's own site-level account: checked against its budget before a round, spent
    /// durably before a noisy input leaves, kept across a reopen; a round that would pass the
    /// budget is refused with both figures.
    #[test]
    fn the_site_level_account_is_checked_spent_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let round = Mechanism::SubsampledGaussian {
            sampling_rate: 1.0,
            noise_multiplier: 2.0,
        };
        assert_eq!(ledger.site_level_epsilon(1e-5).unwrap(), 0.0);
        let first = ledger.check_site_level(round, 8.0, 1e-5).unwrap();
        ledger.spend_site_level(round).unwrap();
        let ledger2 = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger2.site_level_epsilon(1e-5).unwrap(), first);
        let mut ledger = ledger2;
        let mut spent = first;
        while let Ok(after) = ledger.check_site_level(round, 8.0, 1e-5) {
            ledger.spend_site_level(round).unwrap();
            assert!(after > spent);
            spent = after;
        }
        let refusal = ledger.check_site_level(round, 8.0, 1e-5).unwrap_err();
        assert!(
            refusal.contains(&format!("from {spent:.3}"))
                && refusal.contains("policy.site_level_epsilon"),
            "{refusal}"
        );
        assert!(spent <= 8.0);
    }
}
