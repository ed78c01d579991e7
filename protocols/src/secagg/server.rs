//! The coordinator's side of SecAgg+.
//!
//! The server routes keys and encrypted shares, adds masked inputs into a single accumulator as
//! they stream in (memory O(d), not O(n·d); see [`super::upload`]), and at the end removes the self masks of survivors
//! and the pairwise masks of dropouts by re-expanding them from reconstructed secrets.
//!
//! Misbehaviour by one site costs that site its place, never the round: every message is
//! checked against what the server knows (sender, round, stage, neighbour sets, lengths,
//! signatures) and a bad one yields a [`Rejection`] and excludes the site from later stages.
//! The round aborts only when the remaining sites can no longer recover the sum — some site
//! that matters has fewer than `t` live neighbours — and the abort names the site and stage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use super::accumulator::{DEFAULT_SHARD_LEN, Ranges, ShardedAccumulator};
use super::crypto::{self, IdentityVerifier};
use super::graph::{GraphError, NeighbourGraph};
use super::messages::*;
use super::params::{ParamError, Params};
use super::prg::{MaskSeed, MaskStream, Sign};
use super::shamir::{self, ShamirError, Share};
use super::upload::{InputSlot, Outcome};
use super::word::Word;
use super::{ClientId, Millis, RoundId};

/// The stage the server is collecting messages for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencyCheck,
    Unmask,
    Done,
    Aborted,
}

/// How long each stage waits for stragglers, in milliseconds. A site that misses a deadline is
/// a dropout; the server never waits forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageTimeouts {
    pub advertise_keys: Millis,
    pub share_keys: Millis,
    pub masked_input: Millis,
    pub consistency_check: Millis,
    pub unmask: Millis,
}

impl Default for StageTimeouts {
    fn default() -> Self {
        StageTimeouts {
            advertise_keys: 60_000,
            share_keys: 60_000,
            masked_input: 600_000,
            consistency_check: 60_000,
            unmask: 60_000,
        }
    }
}

/// Why a site's message was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RejectReason {
    #[error("not a participant of this round")]
    NotParticipant,
    #[error("the message claims to come from site {claimed}")]
    WrongSender { claimed: ClientId },
    #[error("the message is for {got}")]
    WrongRound { got: RoundId },
    #[error("{got} is not accepted in stage {stage:?}")]
    OutOfStage {
        stage: ServerStage,
        got: &'static str,
    },
    #[error("the stage's deadline has passed")]
    Late,
    #[error("the site was already excluded from this round")]
    Excluded,
    #[error("second {0} from the same site")]
    Duplicate(&'static str),
    #[error("identity not accepted: {0}")]
    BadIdentity(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("public key repeats a key already in the round")]
    ReusedKey,
    #[error("an advertised public key is not a valid X25519 key (off the curve or of small order)")]
    InvalidPublicKey,
    #[error("the signing identity is already used by site {other}")]
    SharedIdentity { other: ClientId },
    #[error(
        "a revealed share of site {owner}'s {kind:?} is not on the polynomial the other shares agree on"
    )]
    WrongRevealedShare { owner: ClientId, kind: ShareKind },
    #[error("the site did not take part in the previous stage")]
    MissedPreviousStage,
    #[error("shares are addressed to the wrong set of neighbours")]
    WrongShareRecipients,
    #[error("an encrypted share has {got} bytes, expected {expected}")]
    BadCiphertextLength { got: usize, expected: usize },
    #[error("the masked vector has {got} elements, expected {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("revealed shares do not match the request: {0}")]
    WrongShares(String),
    #[error("malformed upload: {0}")]
    Malformed(String),
}

/// A refused message: the site, the stage and the reason, for the driver to log.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("site {client} rejected in stage {stage:?}: {reason}")]
pub struct Rejection {
    pub client: ClientId,
    pub stage: ServerStage,
    pub reason: RejectReason,
}

/// Why a round attempt was abandoned. The driver retries with a new attempt and fresh keys.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AbortReason {
    #[error("invalid parameters: {0}")]
    Params(#[from] ParamError),
    #[error("invalid participants: {0}")]
    Graph(#[from] GraphError),
    #[error("invalid roster: {0}")]
    Roster(String),
    #[error("the round is for modulus 2^{round_bits} but the server was built for 2^{server_bits}")]
    ModulusMismatch { round_bits: u32, server_bits: u32 },
    #[error(
        "site {client} has only {live} live neighbours (itself included), fewer than the threshold {threshold}"
    )]
    TooFewNeighbours {
        client: ClientId,
        live: usize,
        threshold: u32,
    },
    /// Fewer sites remain than the threshold: with nobody (or too few) left, every
    /// neighbourhood check would pass vacuously, so the count is checked on its own.
    #[error("only {live} sites remain, fewer than the threshold {threshold}")]
    TooFewSites { live: usize, threshold: u32 },
    #[error("the {kind:?} of site {owner} could not be reconstructed: {error}")]
    Reconstruction {
        owner: ClientId,
        kind: ShareKind,
        error: ShamirError,
    },
    #[error("the reconstructed mask key of site {owner} does not match its advertised key")]
    KeyMismatch { owner: ClientId },
    /// Part of the site's masked input is in the sum and cannot be taken out without
    /// unmasking the site's own input; the attempt must restart without the site.
    #[error("site {client} stopped part-way through its masked input")]
    PartialInput { client: ClientId },
    #[error("the round has already finished")]
    Finished,
}

#[derive(Debug, Error, Clone, PartialEq)]
#[error("{round} aborted in stage {stage:?}: {reason}")]
pub struct Abort {
    pub round: RoundId,
    pub stage: ServerStage,
    pub reason: AbortReason,
}

/// The result of a round: the exact sum of the survivors' quantised vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output<W: Word> {
    pub round: RoundId,
    /// In index ranges, as accumulated: see [`Ranges`].
    pub sum: Ranges<W>,
    /// Sites whose input is in `sum`, sorted.
    pub survivors: Vec<ClientId>,
    /// Participants whose input is not in `sum`, sorted.
    pub dropped: Vec<ClientId>,
    pub rejections: Vec<Rejection>,
}

/// What the driver should do next.
#[derive(Debug)]
pub enum Poll<W: Word> {
    /// Keep collecting messages; call `poll` again at `deadline` at the latest.
    Pending { deadline: Millis },
    /// The stage closed: deliver these messages and collect replies.
    Send(Vec<(ClientId, ServerMessage)>),
    /// The round is complete.
    Done(Box<Output<W>>),
}

/// The server of one round attempt.
pub struct Server<W: Word> {
    params: Params,
    round: RoundId,
    verifier: Arc<dyn IdentityVerifier>,
    /// Built from the server's seed at first; replaced when the advertisement stage closes by
    /// the graph every client derives from the advertisements (see [`crypto::graph_seed`]).
    graph: NeighbourGraph,
    server_seed: [u8; 32],
    participants: BTreeSet<ClientId>,
    /// Site name of every participant, as announced in Setup.
    roster: BTreeMap<ClientId, String>,
    timeouts: StageTimeouts,
    stage: ServerStage,
    deadline: Millis,
    excluded: BTreeSet<ClientId>,
    /// Sites whose transport reported them gone. They are not waited for: a stage closes as
    /// soon as every site it still expects has answered or is gone, exactly as if the
    /// deadline had passed for them. Unlike `excluded`, what a gone site already sent stays
    /// valid, because closing a stage early is a choice the server may always make.
    gone: BTreeSet<ClientId>,
    rejections: Vec<Rejection>,
    /// U1: accepted advertisements.
    advertised: BTreeMap<ClientId, AdvertiseKeys>,
    seen_keys: BTreeSet<[u8; 32]>,
    identities: BTreeMap<ClientId, VerifyingKey>,
    /// Digest of each accepted advertisement, the graph seed's material.
    digests: BTreeMap<ClientId, [u8; 32]>,
    /// U2 (keys): encrypted shares by sender, until routed.
    share_keys: BTreeMap<ClientId, Vec<EncryptedShare>>,
    /// Each sender's signed share list, checked on receipt, forwarded with its shares.
    share_lists: BTreeMap<ClientId, SignedShareList>,
    u2: BTreeSet<ClientId>,
    /// One slot per U2 site while the masked-input stage is open.
    slots: BTreeMap<ClientId, Arc<InputSlot<W>>>,
    /// U3: sites whose masked input is in `acc`, fixed when the masked-input stage closes.
    u3: BTreeSet<ClientId>,
    acc: Arc<ShardedAccumulator<W>>,
    /// U4: consistency signatures.
    signatures: BTreeMap<ClientId, [u8; 64]>,
    /// U5: revealed shares by sender.
    revealed: BTreeMap<ClientId, Vec<RevealedShare>>,
    abort: Option<Abort>,
}

impl<W: Word> std::fmt::Debug for Server<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("round", &self.round)
            .field("stage", &self.stage)
            .field("participants", &self.participants.len())
            .field("excluded", &self.excluded.len())
            .finish_non_exhaustive()
    }
}

impl<W: Word> Server<W> {
    /// Starts a round attempt at time `now` and returns the set-up message for every
    /// participant. `roster` is every participant's id and site name (its certificate's common
    /// name). `graph_seed` must be fresh for every attempt.
    pub fn new(
        params: Params,
        round: RoundId,
        roster: &[(ClientId, String)],
        graph_seed: [u8; 32],
        verifier: Arc<dyn IdentityVerifier>,
        timeouts: StageTimeouts,
        now: Millis,
    ) -> Result<(Self, Setup), Abort> {
        let abort = |reason| Abort {
            round,
            stage: ServerStage::AdvertiseKeys,
            reason,
        };
        params.validate().map_err(|e| abort(e.into()))?;
        if params.modulus.bits() != W::BITS {
            return Err(abort(AbortReason::ModulusMismatch {
                round_bits: params.modulus.bits(),
                server_bits: W::BITS,
            }));
        }
        if roster.len() != params.sites as usize {
            return Err(abort(AbortReason::Graph(GraphError::WrongCount {
                participants: roster.len(),
                sites: params.sites,
            })));
        }
        let participants: Vec<ClientId> = roster.iter().map(|(id, _)| *id).collect();
        let graph = NeighbourGraph::new(&participants, params.neighbours, &graph_seed)
            .map_err(|e| abort(e.into()))?;
        let names: BTreeMap<ClientId, String> = roster.iter().cloned().collect();
        let distinct: BTreeSet<&str> = names.values().map(String::as_str).collect();
        if distinct.len() != names.len() || distinct.contains("") {
            return Err(abort(AbortReason::Roster(
                "site names must be non-empty and distinct".into(),
            )));
        }
        let setup = Setup::new(round, params.clone(), graph_seed, roster);
        let sorted = setup.participants.clone();
        let acc = Arc::new(ShardedAccumulator::new(
            params.vector_len(),
            DEFAULT_SHARD_LEN,
        ));
        Ok((
            Server {
                params,
                round,
                verifier,
                graph,
                server_seed: graph_seed,
                participants: sorted.into_iter().collect(),
                roster: names,
                timeouts,
                stage: ServerStage::AdvertiseKeys,
                deadline: now.saturating_add(timeouts.advertise_keys),
                excluded: BTreeSet::new(),
                gone: BTreeSet::new(),
                rejections: Vec::new(),
                advertised: BTreeMap::new(),
                seen_keys: BTreeSet::new(),
                identities: BTreeMap::new(),
                digests: BTreeMap::new(),
                share_keys: BTreeMap::new(),
                share_lists: BTreeMap::new(),
                u2: BTreeSet::new(),
                slots: BTreeMap::new(),
                u3: BTreeSet::new(),
                acc,
                signatures: BTreeMap::new(),
                revealed: BTreeMap::new(),
                abort: None,
            },
            setup,
        ))
    }

    pub fn stage(&self) -> ServerStage {
        self.stage
    }

    pub fn round(&self) -> RoundId {
        self.round
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn graph(&self) -> &NeighbourGraph {
        &self.graph
    }

    pub fn deadline(&self) -> Millis {
        self.deadline
    }

    /// The rejections that excluded a site, in order (late or out-of-stage messages are only
    /// returned from [`Server::receive`]).
    pub fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// Accepts one message from site `from` (the identity the transport authenticated).
    /// A rejected message excludes its sender from the rest of the round unless it was merely
    /// late or out of stage.
    pub fn receive(
        &mut self,
        from: ClientId,
        msg: ClientMessage<W>,
        now: Millis,
    ) -> Result<(), Rejection> {
        let result = self.check_and_store(from, msg, now);
        if let Err(reason) = &result {
            let exclude = !matches!(
                reason,
                RejectReason::Late
                    | RejectReason::OutOfStage { .. }
                    | RejectReason::Excluded
                    | RejectReason::NotParticipant
            );
            let rejection = Rejection {
                client: from,
                stage: self.stage,
                reason: reason.clone(),
            };
            // Only the rejection that excludes a site is kept (at most one per site), so a
            // site that keeps sending cannot grow the server's memory.
            if exclude {
                self.excluded.insert(from);
                self.rejections.push(rejection.clone());
            }
            return Err(rejection);
        }
        Ok(())
    }

    fn check_and_store(
        &mut self,
        from: ClientId,
        msg: ClientMessage<W>,
        now: Millis,
    ) -> Result<(), RejectReason> {
        if !self.participants.contains(&from) {
            return Err(RejectReason::NotParticipant);
        }
        if self.excluded.contains(&from) {
            return Err(RejectReason::Excluded);
        }
        if msg.sender() != from {
            return Err(RejectReason::WrongSender {
                claimed: msg.sender(),
            });
        }
        if msg.round() != self.round {
            return Err(RejectReason::WrongRound { got: msg.round() });
        }
        if now >= self.deadline && !matches!(self.stage, ServerStage::Done | ServerStage::Aborted) {
            return Err(RejectReason::Late);
        }
        match (self.stage, msg) {
            (ServerStage::AdvertiseKeys, ClientMessage::AdvertiseKeys(m)) => self.on_advertise(m),
            (ServerStage::ShareKeys, ClientMessage::ShareKeys(m)) => self.on_share_keys(m),
            (ServerStage::MaskedInput, ClientMessage::MaskedInput(m)) => self.on_masked_input(m),
            (ServerStage::ConsistencyCheck, ClientMessage::ConsistencySignature(m)) => {
                self.on_consistency(m)
            }
            (ServerStage::Unmask, ClientMessage::UnmaskShares(m)) => self.on_unmask(m),
            (stage, msg) => Err(RejectReason::OutOfStage {
                stage,
                got: msg.name(),
            }),
        }
    }

    fn on_advertise(&mut self, m: AdvertiseKeys) -> Result<(), RejectReason> {
        if self.advertised.contains_key(&m.sender) {
            return Err(RejectReason::Duplicate("AdvertiseKeys"));
        }
        let name = self
            .roster
            .get(&m.sender)
            .ok_or(RejectReason::NotParticipant)?;
        let key = self
            .verifier
            .verify_identity(m.sender, name, &m.credential)
            .map_err(RejectReason::BadIdentity)?;
        let payload = crypto::advertise_payload(
            self.round,
            m.sender,
            name,
            &m.cipher_pk,
            &m.mask_pk,
            &m.self_commitment,
        );
        if !crypto::verify(&key, &payload, &m.signature) {
            return Err(RejectReason::BadSignature);
        }
        if !crypto::valid_public_key(&m.cipher_pk) || !crypto::valid_public_key(&m.mask_pk) {
            return Err(RejectReason::InvalidPublicKey);
        }
        if let Some((&other, _)) = self.identities.iter().find(|(_, k)| **k == key) {
            return Err(RejectReason::SharedIdentity { other });
        }
        if m.cipher_pk == m.mask_pk
            || self.seen_keys.contains(&m.cipher_pk)
            || self.seen_keys.contains(&m.mask_pk)
        {
            return Err(RejectReason::ReusedKey);
        }
        self.seen_keys.insert(m.cipher_pk);
        self.seen_keys.insert(m.mask_pk);
        self.identities.insert(m.sender, key);
        self.digests
            .insert(m.sender, crypto::advertisement_digest(&payload));
        self.advertised.insert(m.sender, m);
        Ok(())
    }

    fn on_share_keys(&mut self, m: ShareKeys) -> Result<(), RejectReason> {
        if !self.advertised.contains_key(&m.sender) {
            return Err(RejectReason::MissedPreviousStage);
        }
        if self.share_keys.contains_key(&m.sender) {
            return Err(RejectReason::Duplicate("ShareKeys"));
        }
        let expected: Vec<ClientId> = self
            .graph
            .neighbours(m.sender)
            .into_iter()
            .filter(|v| *v != m.sender && self.advertised.contains_key(v))
            .collect();
        let mut got: Vec<ClientId> = m.shares.iter().map(|s| s.peer).collect();
        got.sort_unstable();
        if got != expected {
            return Err(RejectReason::WrongShareRecipients);
        }
        if let Some(bad) = m
            .shares
            .iter()
            .find(|s| s.ciphertext.len() != SHARE_CIPHERTEXT_BYTES)
        {
            return Err(RejectReason::BadCiphertextLength {
                got: bad.ciphertext.len(),
                expected: SHARE_CIPHERTEXT_BYTES,
            });
        }
        // The signed list is checked here, so an honest coordinator never forwards a share
        // its sender did not sign, and a recipient can then blame the right party.
        let digests: Vec<(ClientId, [u8; 32])> = m
            .shares
            .iter()
            .map(|s| (s.peer, crypto::share_digest(&s.ciphertext)))
            .collect();
        let key = self
            .identities
            .get(&m.sender)
            .ok_or(RejectReason::MissedPreviousStage)?;
        let payload = crypto::share_list_payload(self.round, m.sender, &digests);
        if !crypto::verify(key, &payload, &m.signature) {
            return Err(RejectReason::BadSignature);
        }
        self.share_lists.insert(
            m.sender,
            SignedShareList {
                sender: m.sender,
                digests,
                signature: m.signature,
            },
        );
        self.share_keys.insert(m.sender, m.shares);
        Ok(())
    }

    fn on_masked_input(&mut self, m: MaskedInput<W>) -> Result<(), RejectReason> {
        let slot = self
            .slots
            .get(&m.sender)
            .ok_or(RejectReason::MissedPreviousStage)?;
        slot.add_whole(&m.values)
    }

    /// Whether `from` sent `to` an encrypted share in this attempt that was forwarded: `from`
    /// is in U2 and its signed share list names `to`. Only then can `to` have a share of
    /// `from`'s that does not decrypt, so only then is an accusation by `to` backed by
    /// evidence (the signed list it holds).
    pub fn forwarded_share(&self, from: ClientId, to: ClientId) -> bool {
        self.u2.contains(&from)
            && self.u2.contains(&to)
            && self
                .share_lists
                .get(&from)
                .is_some_and(|l| l.digests.iter().any(|(t, _)| *t == to))
    }

    /// The slots into which the transport streams each site's masked input, while the
    /// masked-input stage is open (empty otherwise). Each slot accepts only its own site's
    /// upload; route by the authenticated identity, never by what the upload claims.
    pub fn input_slots(&self) -> Vec<(ClientId, Arc<InputSlot<W>>)> {
        if self.stage != ServerStage::MaskedInput {
            return Vec::new();
        }
        self.slots.iter().map(|(id, s)| (*id, s.clone())).collect()
    }

    fn on_consistency(&mut self, m: ConsistencySignature) -> Result<(), RejectReason> {
        if !self.u3.contains(&m.sender) {
            return Err(RejectReason::MissedPreviousStage);
        }
        if self.signatures.contains_key(&m.sender) {
            return Err(RejectReason::Duplicate("ConsistencySignature"));
        }
        let survivors: Vec<ClientId> = self.u3.iter().copied().collect();
        let payload = crypto::consistency_payload(self.round, &survivors);
        let key = self
            .identities
            .get(&m.sender)
            .ok_or(RejectReason::MissedPreviousStage)?;
        if !crypto::verify(key, &payload, &m.signature) {
            return Err(RejectReason::BadSignature);
        }
        self.signatures.insert(m.sender, m.signature);
        Ok(())
    }

    fn on_unmask(&mut self, m: UnmaskShares) -> Result<(), RejectReason> {
        let eligible = if self.params.consistency_check {
            self.signatures.contains_key(&m.sender)
        } else {
            self.u3.contains(&m.sender)
        };
        if !eligible {
            return Err(RejectReason::MissedPreviousStage);
        }
        if self.revealed.contains_key(&m.sender) {
            return Err(RejectReason::Duplicate("UnmaskShares"));
        }
        // The sender holds shares of exactly its neighbours that shared keys, itself included.
        let expected: Vec<ClientId> = self
            .graph
            .neighbours(m.sender)
            .into_iter()
            .filter(|v| self.u2.contains(v))
            .collect();
        let mut got: Vec<ClientId> = m.shares.iter().map(|s| s.owner).collect();
        got.sort_unstable();
        if got != expected {
            return Err(RejectReason::WrongShares(format!(
                "shares for {got:?}, expected one for each of {expected:?}"
            )));
        }
        for s in &m.shares {
            let want = if self.u3.contains(&s.owner) {
                ShareKind::SelfMaskSeed
            } else {
                ShareKind::MaskKey
            };
            if s.kind != want {
                return Err(RejectReason::WrongShares(format!(
                    "a {:?} share for site {}, expected {:?}",
                    s.kind, s.owner, want
                )));
            }
        }
        self.revealed.insert(m.sender, m.shares);
        Ok(())
    }

    /// Records that site `id` is gone (its connection closed): the open stage and every later
    /// one stop waiting for it, so one dead site costs the others nothing but its own absence.
    /// A site that comes back takes part again only in a new attempt.
    pub fn disconnected(&mut self, id: ClientId) {
        if self.participants.contains(&id) {
            self.gone.insert(id);
        }
    }

    /// The sites the open stage is still waiting for (neither answered, excluded nor gone),
    /// for the transport's "waiting for" log lines.
    pub fn awaiting(&self) -> Vec<ClientId> {
        let Some((expected, answered)) = self.expected_answered() else {
            return Vec::new();
        };
        expected
            .into_iter()
            .filter(|c| !answered.contains(c) && self.counts(c))
            .collect()
    }

    /// Whether a site still counts for the stage's completion.
    fn counts(&self, c: &ClientId) -> bool {
        !self.excluded.contains(c) && !self.gone.contains(c)
    }

    /// Who is expected in the open stage and who has answered; None once the round is over.
    fn expected_answered(&self) -> Option<(Vec<ClientId>, Vec<ClientId>)> {
        Some(match self.stage {
            ServerStage::AdvertiseKeys => (
                self.participants.iter().copied().collect(),
                self.advertised.keys().copied().collect(),
            ),
            ServerStage::ShareKeys => (
                self.advertised.keys().copied().collect(),
                self.share_keys.keys().copied().collect(),
            ),
            ServerStage::MaskedInput => (
                self.u2.iter().copied().collect(),
                self.slots
                    .iter()
                    .filter(|(_, s)| s.settled())
                    .map(|(id, _)| *id)
                    .collect(),
            ),
            ServerStage::ConsistencyCheck => (
                self.u3.iter().copied().collect(),
                self.signatures.keys().copied().collect(),
            ),
            ServerStage::Unmask => (
                if self.params.consistency_check {
                    self.signatures.keys().copied().collect()
                } else {
                    self.u3.iter().copied().collect()
                },
                self.revealed.keys().copied().collect(),
            ),
            ServerStage::Done | ServerStage::Aborted => return None,
        })
    }

    /// Advances the round at time `now`: closes the open stage when everyone it expects has
    /// answered (or is excluded or gone) or its deadline has passed.
    pub fn poll(&mut self, now: Millis) -> Result<Poll<W>, Abort> {
        if let Some(a) = &self.abort {
            return Err(a.clone());
        }
        // Excluded and gone sites count as neither expected nor answered.
        let Some((expected, answered)) = self.expected_answered() else {
            return Err(self.abort_with(AbortReason::Finished));
        };
        let live = |ids: &[ClientId]| ids.iter().filter(|c| self.counts(c)).count();
        if live(&answered) < live(&expected) && now < self.deadline {
            return Ok(Poll::Pending {
                deadline: self.deadline,
            });
        }
        let result = match self.stage {
            ServerStage::AdvertiseKeys => self.close_advertise(now),
            ServerStage::ShareKeys => self.close_share_keys(now),
            ServerStage::MaskedInput => self.close_masked_input(now),
            ServerStage::ConsistencyCheck => self.close_consistency(now),
            ServerStage::Unmask => self.close_unmask(),
            ServerStage::Done | ServerStage::Aborted => Err(AbortReason::Finished),
        };
        result.map_err(|reason| self.abort_with(reason))
    }

    fn abort_with(&mut self, reason: AbortReason) -> Abort {
        let abort = Abort {
            round: self.round,
            stage: self.stage,
            reason,
        };
        if self.abort.is_none() && !matches!(abort.reason, AbortReason::Finished) {
            self.abort = Some(abort.clone());
            self.stage = ServerStage::Aborted;
            // Free what the aborted attempt held; nothing of it may be reused.
            for slot in self.slots.values() {
                slot.seal();
            }
            self.slots.clear();
            drop(self.acc.take());
            self.share_keys.clear();
            self.revealed.clear();
        }
        abort
    }

    /// Every site in `need` must keep at least `t` neighbours (itself included) in `live`.
    fn check_quorum(
        &self,
        live: &BTreeSet<ClientId>,
        need: &BTreeSet<ClientId>,
    ) -> Result<(), AbortReason> {
        let t = self.params.threshold;
        for &v in need {
            let count = self
                .graph
                .neighbours(v)
                .iter()
                .filter(|u| live.contains(u))
                .count();
            if count < t as usize {
                return Err(AbortReason::TooFewNeighbours {
                    client: v,
                    live: count,
                    threshold: t,
                });
            }
        }
        // Passing every neighbourhood check implies t live sites, unless there was no one to
        // check: then the round would "finish" with an empty sum.
        if live.len() < t as usize {
            return Err(AbortReason::TooFewSites {
                live: live.len(),
                threshold: t,
            });
        }
        Ok(())
    }

    fn open_stage(&mut self, stage: ServerStage, now: Millis) {
        let timeout = match stage {
            ServerStage::AdvertiseKeys => self.timeouts.advertise_keys,
            ServerStage::ShareKeys => self.timeouts.share_keys,
            ServerStage::MaskedInput => self.timeouts.masked_input,
            ServerStage::ConsistencyCheck => self.timeouts.consistency_check,
            ServerStage::Unmask => self.timeouts.unmask,
            ServerStage::Done | ServerStage::Aborted => 0,
        };
        self.stage = stage;
        self.deadline = now.saturating_add(timeout);
    }

    fn close_advertise(&mut self, now: Millis) -> Result<Poll<W>, AbortReason> {
        self.advertised.retain(|id, _| !self.excluded.contains(id));
        let u1: BTreeSet<ClientId> = self.advertised.keys().copied().collect();
        // The graph every client will derive: from the accepted advertisements unless it is
        // complete, where the seed changes nothing and the list is not sent.
        let advertisers: Vec<(ClientId, [u8; 32])> = if self.params.neighbours == self.params.sites
        {
            Vec::new()
        } else {
            let list: Vec<(ClientId, [u8; 32])> = u1
                .iter()
                .filter_map(|id| self.digests.get(id).map(|d| (*id, *d)))
                .collect();
            let seed = crypto::graph_seed(self.round, &self.server_seed, &list);
            let participants: Vec<ClientId> = self.participants.iter().copied().collect();
            self.graph = NeighbourGraph::new(&participants, self.params.neighbours, &seed)?;
            list
        };
        self.check_quorum(&u1, &u1)?;
        let messages = u1
            .iter()
            .map(|&u| {
                let keys = self
                    .graph
                    .neighbours(u)
                    .into_iter()
                    .filter(|v| *v != u)
                    .filter_map(|v| self.advertised.get(&v).cloned())
                    .collect();
                (
                    u,
                    ServerMessage::NeighbourKeys(NeighbourKeys {
                        round: self.round,
                        keys,
                        advertisers: advertisers.clone(),
                    }),
                )
            })
            .collect();
        self.open_stage(ServerStage::ShareKeys, now);
        Ok(Poll::Send(messages))
    }

    fn close_share_keys(&mut self, now: Millis) -> Result<Poll<W>, AbortReason> {
        self.share_keys.retain(|id, _| !self.excluded.contains(id));
        self.u2 = self.share_keys.keys().copied().collect();
        self.check_quorum(&self.u2, &self.u2)?;
        let mut inbox: BTreeMap<ClientId, Vec<EncryptedShare>> =
            self.u2.iter().map(|&u| (u, Vec::new())).collect();
        for (sender, shares) in std::mem::take(&mut self.share_keys) {
            for s in shares {
                if let Some(list) = inbox.get_mut(&s.peer) {
                    list.push(EncryptedShare {
                        peer: sender,
                        ciphertext: s.ciphertext,
                    });
                }
            }
        }
        let messages = inbox
            .into_iter()
            .map(|(u, shares)| {
                (
                    u,
                    ServerMessage::ForwardedShares(ForwardedShares {
                        round: self.round,
                        lists: shares
                            .iter()
                            .filter_map(|s| self.share_lists.get(&s.peer).cloned())
                            .collect(),
                        shares,
                    }),
                )
            })
            .collect();
        self.slots = self
            .u2
            .iter()
            .map(|&u| (u, Arc::new(InputSlot::new(u, self.round, self.acc.clone()))))
            .collect();
        self.open_stage(ServerStage::MaskedInput, now);
        Ok(Poll::Send(messages))
    }

    fn close_masked_input(&mut self, now: Millis) -> Result<Poll<W>, AbortReason> {
        // Sealing fixes U3: after this no upload can change the sum. Inputs already added
        // stay in it even if the site is excluded later: its self mask is then removed with
        // the other survivors' shares.
        let mut partial = None;
        for (id, slot) in std::mem::take(&mut self.slots) {
            match slot.seal() {
                Outcome::Complete => {
                    self.u3.insert(id);
                }
                Outcome::Missing => {}
                Outcome::Refused(reason) => {
                    self.excluded.insert(id);
                    self.rejections.push(Rejection {
                        client: id,
                        stage: ServerStage::MaskedInput,
                        reason,
                    });
                }
                Outcome::Partial => partial = partial.or(Some(id)),
            }
        }
        if let Some(client) = partial {
            return Err(AbortReason::PartialInput { client });
        }
        self.check_quorum(&self.u3, &self.u2)?;
        let survivors: Vec<ClientId> = self.u3.iter().copied().collect();
        let messages = if self.params.consistency_check {
            self.open_stage(ServerStage::ConsistencyCheck, now);
            survivors
                .iter()
                .map(|&u| {
                    (
                        u,
                        ServerMessage::ConsistencyRequest(ConsistencyRequest {
                            round: self.round,
                            survivors: survivors.clone(),
                        }),
                    )
                })
                .collect()
        } else {
            self.open_stage(ServerStage::Unmask, now);
            let dropped: Vec<ClientId> = self.u2.difference(&self.u3).copied().collect();
            survivors
                .iter()
                .map(|&u| {
                    (
                        u,
                        ServerMessage::UnmaskRequest(UnmaskRequest {
                            round: self.round,
                            survivors: survivors.clone(),
                            dropped: dropped.clone(),
                            signatures: Vec::new(),
                        }),
                    )
                })
                .collect()
        };
        Ok(Poll::Send(messages))
    }

    fn close_consistency(&mut self, now: Millis) -> Result<Poll<W>, AbortReason> {
        self.signatures.retain(|id, _| !self.excluded.contains(id));
        let u4: BTreeSet<ClientId> = self.signatures.keys().copied().collect();
        self.check_quorum(&u4, &self.u2)?;
        let survivors: Vec<ClientId> = self.u3.iter().copied().collect();
        let dropped: Vec<ClientId> = self.u2.difference(&self.u3).copied().collect();
        let messages = u4
            .iter()
            .map(|&u| {
                let signatures = self
                    .graph
                    .neighbours(u)
                    .into_iter()
                    .filter(|v| *v != u)
                    .filter_map(|v| self.signatures.get(&v).map(|s| (v, *s)))
                    .collect();
                (
                    u,
                    ServerMessage::UnmaskRequest(UnmaskRequest {
                        round: self.round,
                        survivors: survivors.clone(),
                        dropped: dropped.clone(),
                        signatures,
                    }),
                )
            })
            .collect();
        self.open_stage(ServerStage::Unmask, now);
        Ok(Poll::Send(messages))
    }

    fn close_unmask(&mut self) -> Result<Poll<W>, AbortReason> {
        self.revealed.retain(|id, _| !self.excluded.contains(id));
        let u5: BTreeSet<ClientId> = self.revealed.keys().copied().collect();
        self.check_quorum(&u5, &self.u2)?;
        // owner -> (holder, share), gathered from the responders.
        let mut by_owner: BTreeMap<ClientId, Vec<(ClientId, &Share)>> = BTreeMap::new();
        for (&holder, shares) in &self.revealed {
            for s in shares {
                by_owner
                    .entry(s.owner)
                    .or_default()
                    .push((holder, &s.share));
            }
        }
        let t = self.params.threshold as usize;
        // Masks are removed range by range, in place: the sum is never copied.
        let acc = &self.acc;
        let unmask = |seed: &MaskSeed, sign: Sign| {
            let mut stream = MaskStream::new(seed);
            acc.for_each_range(|part| stream.apply(part, sign));
        };
        let mut liars: BTreeSet<ClientId> = BTreeSet::new();
        for &owner in &self.u2 {
            let shares = by_owner.get(&owner).map(Vec::as_slice).unwrap_or(&[]);
            let survived = self.u3.contains(&owner);
            let kind = if survived {
                ShareKind::SelfMaskSeed
            } else {
                ShareKind::MaskKey
            };
            let advertised = self
                .advertised
                .get(&owner)
                .ok_or(AbortReason::KeyMismatch { owner })?;
            // The signed advertisement commits to both secrets: a hash of the self-mask seed,
            // and the mask key's public half. A crafted share cannot pass either check, and a
            // subset of honest shares that does identifies the shares that are off it.
            let round = self.round;
            let accept = |secret: &[u8; 32]| {
                if survived {
                    crypto::self_commitment(round, owner, secret) == advertised.self_commitment
                } else {
                    PublicKey::from(&StaticSecret::from(*secret)).to_bytes() == advertised.mask_pk
                }
            };
            let verified = shamir::reconstruct_verified(shares, t, accept)
                .map_err(|error| AbortReason::Reconstruction { owner, kind, error })?;
            for holder in verified.wrong.iter().copied() {
                if liars.insert(holder) {
                    self.excluded.insert(holder);
                    self.rejections.push(Rejection {
                        client: holder,
                        stage: ServerStage::Unmask,
                        reason: RejectReason::WrongRevealedShare { owner, kind },
                    });
                }
            }
            if survived {
                let seed = crypto::self_mask_seed(&verified.secret, self.round, owner);
                unmask(&seed, Sign::Sub);
            } else {
                let sk = StaticSecret::from(verified.secret);
                // Undo the pairwise masks the survivors added with the dropped site.
                for u in self.graph.neighbours(owner) {
                    if u == owner || !self.u3.contains(&u) {
                        continue;
                    }
                    let Some(peer) = self.advertised.get(&u) else {
                        continue;
                    };
                    let shared = crypto::agree(&sk, &peer.mask_pk)
                        .ok_or(AbortReason::KeyMismatch { owner: u })?;
                    let seed = crypto::pairwise_seed(&shared, self.round, u, owner);
                    let added = if u < owner { Sign::Add } else { Sign::Sub };
                    unmask(&seed, added.flip());
                }
            }
        }
        self.stage = ServerStage::Done;
        self.revealed.clear();
        Ok(Poll::Done(Box::new(Output {
            round: self.round,
            sum: self.acc.take(),
            survivors: self.u3.iter().copied().collect(),
            dropped: self.participants.difference(&self.u3).copied().collect(),
            rejections: self.rejections.clone(),
        })))
    }
}
