//! The round context: one digest of everything a site is told about a SecAgg+ round, which
//! every signature of the round covers (it is part of [`RoundId`]).
//!
//! The coordinator tells each site its round separately: the announcement (task, model hash,
//! training settings, feature statistics, the federation manifest) and the SecAgg+ set-up
//! (parameters, the graph seed, the roster). A coordinator that told one site something other
//! than the rest — a smaller clipping bound, a tiny learning rate, other feature statistics,
//! another model (Pasquini et al., CCS 2022), another manifest — could read that site's update
//! out of an honest-looking sum. Each site computes the context from what *it* was told (and
//! from the manifest *it* pins, not the one relayed) and signs its key advertisement under it;
//! its peers verify under theirs. Two sites told different things therefore cannot verify
//! each other, and the round fails before any masked input is sent.
//!
//! Fields are length-prefixed before hashing, so no two different rounds hash the same bytes.

use sha2::{Digest, Sha256};

use crate::secagg::{RoundId, ServerMessage, Setup};

const ANNOUNCEMENT_LABEL: &[u8] = b"cohort round announcement v1\0";
const CONTEXT_LABEL: &[u8] = b"cohort round context v1\0";

/// What the coordinator announces for a round, as each site receives it.
#[derive(Debug, Clone, Copy)]
pub struct Announcement<'a> {
    pub round: u64,
    pub attempt: u32,
    /// The task's wire value (statistics, training).
    pub task: i32,
    pub secure: bool,
    pub model_sha3_512: &'a [u8],
    pub training_toml: &'a str,
    pub feature_mean: &'a [f64],
    pub feature_std: &'a [f64],
}

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn floats(h: &mut Sha256, values: &[f64]) {
    h.update((values.len() as u64).to_le_bytes());
    for v in values {
        h.update(v.to_bits().to_le_bytes());
    }
}

impl Announcement<'_> {
    /// The announcement bound to `manifest`, the digest of the federation manifest the site
    /// pins (all zeros without one): the first half of the context, known before the SecAgg+
    /// set-up arrives.
    pub fn digest(&self, manifest: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(ANNOUNCEMENT_LABEL);
        h.update(manifest);
        h.update(self.round.to_le_bytes());
        h.update(self.attempt.to_le_bytes());
        h.update(self.task.to_le_bytes());
        h.update([u8::from(self.secure)]);
        field(&mut h, self.model_sha3_512);
        field(&mut h, self.training_toml.as_bytes());
        floats(&mut h, self.feature_mean);
        floats(&mut h, self.feature_std);
        h.finalize().into()
    }
}

/// The round's context: the announcement digest and the whole SecAgg+ set-up (its own
/// context field excluded, which is what is being computed).
pub fn round_context(announced: &[u8; 32], setup: &Setup) -> [u8; 32] {
    let mut probe = setup.clone();
    probe.round = RoundId::new(setup.round.round, setup.round.attempt);
    let mut h = Sha256::new();
    h.update(CONTEXT_LABEL);
    h.update(announced);
    field(&mut h, &ServerMessage::Setup(probe).encode());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::Params;

    fn setup(clip: f32) -> Setup {
        Setup {
            round: RoundId::new(3, 1),
            params: Params {
                clip,
                ..Params::with_defaults(4, 10)
            },
            graph_seed: [7; 32],
            participants: vec![0, 1, 2, 3],
            names: ["a", "b", "c", "d"].map(String::from).to_vec(),
        }
    }

    fn noisy(sigma: f64, min_survivors: u32) -> Setup {
        let mut s = setup(1.0);
        s.params.noise = Some(crate::secagg::Noise {
            sigma,
            min_survivors,
        });
        s
    }

    #[test]
    fn every_part_of_what_a_site_is_told_changes_the_context() {
        let a = Announcement {
            round: 3,
            attempt: 1,
            task: 2,
            secure: true,
            model_sha3_512: &[1; 64],
            training_toml: "learning_rate = 0.01",
            feature_mean: &[0.5, 1.0],
            feature_std: &[1.0, 2.0],
        };
        let m = [9u8; 32];
        let base = round_context(&a.digest(&m), &setup(1.0));
        // The context field itself is not an input.
        let mut s = setup(1.0);
        s.round = s.round.with_context([5; 32]);
        assert_eq!(round_context(&a.digest(&m), &s), base);
        let variants = [
            round_context(&a.digest(&[8; 32]), &setup(1.0)),
            round_context(&a.digest(&m), &setup(1e6)),
            round_context(
                &Announcement {
                    training_toml: "learning_rate = 1e-30",
                    ..a
                }
                .digest(&m),
                &setup(1.0),
            ),
            round_context(
                &Announcement {
                    feature_mean: &[0.5, 1.5],
                    ..a
                }
                .digest(&m),
                &setup(1.0),
            ),
            round_context(
                &Announcement {
                    model_sha3_512: &[2; 64],
                    ..a
                }
                .digest(&m),
                &setup(1.0),
            ),
            round_context(&Announcement { secure: false, ..a }.digest(&m), &setup(1.0)),
            round_context(
                &a.digest(&m),
                &Setup {
                    graph_seed: [8; 32],
                    ..setup(1.0)
                },
            ),
            round_context(
                &a.digest(&m),
                &Setup {
                    names: ["a", "b", "c", "e"].map(String::from).to_vec(),
                    ..setup(1.0)
                },
            ),
            // Site-level DP: a site told less noise than its peers (or none) is in another
            // round, so it cannot verify them and the round fails before any input is sent.
            round_context(&a.digest(&m), &noisy(300.0, 3)),
            round_context(&a.digest(&m), &noisy(30.0, 3)),
            round_context(&a.digest(&m), &noisy(300.0, 4)),
            // A site told a looser norm bound than its peers is in another round too.
            round_context(&a.digest(&m), &{
                let mut s = setup(1.0);
                s.params.norm_bound = Some(0.5);
                s
            }),
        ];
        assert_ne!(
            round_context(&a.digest(&m), &noisy(300.0, 3)),
            round_context(&a.digest(&m), &noisy(300.0 * (1.0 + f64::EPSILON), 3))
        );
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
        }
    }
}
