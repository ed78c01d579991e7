//! The site's side of SecAgg+.
//!
//! The client is a one-way state machine: each stage can run at most once, so whatever the
//! server sends, a client reveals at most one kind of share per peer (the self-mask seed share
//! of a survivor or the mask-key share of a dropout, never both). Secrets live only in this
//! struct, are zeroised when it is dropped or fails, and never appear in `Debug` output.
//!
//! A message for another round or out of order is refused but leaves the client as it was
//! (a stale duplicate must not kill a healthy round). Everything that indicates an attack or
//! an inconsistent server — a bad signature, a share that fails to decrypt, a survivor set that
//! changed after it was signed — fails the client for good.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chacha20::ChaCha20Rng;
use ed25519_dalek::VerifyingKey;
use rand_core::{Rng, SeedableRng};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::crypto::{self, IdentityVerifier, SharedSecret, SiteIdentity};
use super::graph::{GraphError, NeighbourGraph};
use super::messages::*;
use super::params::{ParamError, Params};
use super::prg::{Sign, apply_mask};
use super::quant::QuantisedInput;
use super::shamir::{self, SHARE_BYTES, Share};
use super::word::Word;
use super::{ClientId, RoundId};
use crate::identity::COORDINATOR_COMMON_NAME;

/// Where a client is in the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStage {
    AwaitingSetup,
    AwaitingNeighbourKeys,
    AwaitingShares,
    /// Shares are in; masking waits for the local update (training may still be running).
    AwaitingInput,
    /// The masked input was sent; waiting for the consistency check or the unmask request.
    AwaitingSurvivors,
    /// The survivor set was signed; waiting for the unmask request.
    AwaitingUnmask,
    Done,
    Failed,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ClientError {
    #[error("{got} is not expected while the client is in stage {stage:?}")]
    UnexpectedMessage {
        stage: ClientStage,
        got: &'static str,
    },
    #[error("message for {got}, but this client is in {expected}")]
    WrongRound { expected: RoundId, got: RoundId },
    #[error("the server's parameters are unsafe or invalid: {0}")]
    InvalidParams(#[from] ParamError),
    #[error("the round uses modulus 2^{round_bits} but this client was built for 2^{client_bits}")]
    ModulusMismatch { round_bits: u32, client_bits: u32 },
    #[error("{participants} participants listed but the parameters say {sites}")]
    ParticipantCount { participants: usize, sites: u32 },
    #[error("this site ({id}) is not among the round's participants")]
    NotAParticipant { id: ClientId },
    #[error("the roster is not acceptable: {0}")]
    BadRoster(String),
    #[error("the neighbour graph's seed material is inconsistent: {0}")]
    SeedMaterial(String),
    #[error("neighbour {peer} advertised keys but they were not forwarded to this site")]
    MissingNeighbourKeys { peer: ClientId },
    #[error("site {peer} signs with the same identity as another site in the round")]
    SharedIdentity { peer: ClientId },
    #[error("neighbour graph: {0}")]
    Graph(#[from] GraphError),
    #[error("site {peer}'s identity was not accepted: {reason}")]
    BadIdentity { peer: ClientId, reason: String },
    #[error("site {peer}'s signature does not verify: its keys may have been substituted")]
    BadSignature { peer: ClientId },
    #[error("site {peer}'s keys were advertised for another round: replayed")]
    ReplayedKey { peer: ClientId },
    #[error("site {peer} is not a neighbour of this site in this round")]
    NotANeighbour { peer: ClientId },
    #[error("site {peer} appears twice")]
    Duplicate { peer: ClientId },
    #[error("site {peer}'s public key repeats another key in the round")]
    ReusedKey { peer: ClientId },
    #[error("site {peer}'s public key is a low-order point")]
    WeakKey { peer: ClientId },
    #[error(
        "only {live} live neighbours (this site included) at stage {stage:?}, threshold is {threshold}"
    )]
    TooFewNeighbours {
        stage: ClientStage,
        live: usize,
        threshold: u32,
    },
    #[error("site {peer} signed shares for this site that do not decrypt: site {peer} is at fault")]
    ShareDecryption { peer: ClientId },
    #[error("site {peer} signed shares for this site that are malformed: site {peer} is at fault")]
    MalformedShare { peer: ClientId },
    #[error(
        "the share from site {peer} does not decrypt and is not the one site {peer} signed for this site: it was altered after it left that site (by the coordinator, which forwards it)"
    )]
    TamperedShare { peer: ClientId },
    #[error("the input has {got} elements, the round needs {expected}")]
    InputLength { got: usize, expected: usize },
    #[error("the survivor set is inconsistent: {0}")]
    InconsistentSurvivors(String),
    #[error("the server asked for both shares of site {peer}: refused")]
    BothSharesRequested { peer: ClientId },
    #[error("the unmask request says nothing about neighbour {peer}")]
    IncompleteUnmaskRequest { peer: ClientId },
    #[error("the survivor set differs from the one this site signed")]
    SurvivorSetChanged,
    #[error(
        "only {others} other live sites in this site's neighbourhood at stage {stage:?}; this site requires {required}"
    )]
    TooFewLive {
        stage: ClientStage,
        others: usize,
        required: u32,
    },
    #[error("the round has {survivors} surviving sites; this site requires {required}")]
    TooFewSurvivors { survivors: usize, required: u32 },
    #[error("this client failed earlier in the round; start a new attempt")]
    Failed,
}

impl ClientError {
    /// Errors that leave the client usable: stale or misordered messages.
    fn is_benign(&self) -> bool {
        matches!(
            self,
            ClientError::UnexpectedMessage { .. } | ClientError::WrongRound { .. }
        )
    }
}

/// What this site knows about a neighbour whose signed keys it accepted.
struct Peer {
    verifying_key: VerifyingKey,
    cipher_secret: SharedSecret,
    mask_secret: SharedSecret,
    /// The neighbour's shares of its own secrets (self-mask seed, mask key), once received.
    shares: Option<(Share, Share)>,
}

impl ClientError {
    /// The site this error proves at fault, when it does: shares it signed that do not
    /// decrypt or parse. (A share whose signature fails accuses no site: the coordinator
    /// forwards shares, so it may have altered them.)
    pub fn accused(&self) -> Option<ClientId> {
        match self {
            ClientError::ShareDecryption { peer } | ClientError::MalformedShare { peer } => {
                Some(*peer)
            }
            _ => None,
        }
    }
}

/// State of one site in one round attempt. Build a new one for every attempt.
pub struct Client<W: Word> {
    identity: SiteIdentity,
    verifier: Arc<dyn IdentityVerifier>,
    round: RoundId,
    rng: ChaCha20Rng,
    stage: ClientStage,
    params: Option<Params>,
    /// The round's participants (sorted) and their roster names, from Setup.
    roster: BTreeMap<ClientId, String>,
    /// The server's part of the graph seed, from Setup.
    server_seed: [u8; 32],
    /// Digest of this site's own advertisement, which must be in the graph seed's material.
    my_digest: [u8; 32],
    graph: Option<NeighbourGraph>,
    cipher_sk: Option<StaticSecret>,
    mask_sk: Option<StaticSecret>,
    /// This site's advertised (cipher, mask) public keys, to detect key reuse by others.
    my_public: ([u8; 32], [u8; 32]),
    self_seed: [u8; 32],
    own_shares: Option<(Share, Share)>,
    peers: BTreeMap<ClientId, Peer>,
    input: Option<QuantisedInput<W>>,
    signed_survivors: Option<Vec<ClientId>>,
    /// The site's own floor on live verified neighbours besides itself, at every stage
    /// ([`Client::requiring`]); 0: the threshold alone.
    min_live_others: u32,
    /// The site's own floor on the survivors of the round (participants of the roster).
    min_survivors: u32,
}

impl<W: Word> std::fmt::Debug for Client<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.identity.id)
            .field("round", &self.round)
            .field("stage", &self.stage)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl<W: Word> Drop for Client<W> {
    fn drop(&mut self) {
        self.self_seed.zeroize();
    }
}

impl<W: Word> Client<W> {
    /// A client for `round`. `rng_seed` must come from a CSPRNG (the OS) in production; it is a
    /// parameter so tests and simulations replay exactly.
    pub fn new(
        identity: SiteIdentity,
        verifier: Arc<dyn IdentityVerifier>,
        round: RoundId,
        rng_seed: [u8; 32],
    ) -> Self {
        Client {
            identity,
            verifier,
            round,
            rng: ChaCha20Rng::from_seed(rng_seed),
            stage: ClientStage::AwaitingSetup,
            params: None,
            roster: BTreeMap::new(),
            server_seed: [0; 32],
            my_digest: [0; 32],
            graph: None,
            cipher_sk: None,
            mask_sk: None,
            my_public: ([0; 32], [0; 32]),
            self_seed: [0; 32],
            own_shares: None,
            peers: BTreeMap::new(),
            input: None,
            signed_survivors: None,
            min_live_others: 0,
            min_survivors: 0,
        }
    }

    /// Refuses the round, at whichever stage it becomes true, when fewer than `live_others`
    /// other sites of this site's neighbourhood are live — advertised keys it verified, then
    /// shared, then survived — or fewer than `survivors` sites survive the round. The roster
    /// a coordinator announces counts for nothing here: it can list honest sites and withhold
    /// their keys, which looks to this site like ordinary dropouts, until the sum is over
    /// this site and the coordinator's own.
    pub fn requiring(mut self, live_others: u32, survivors: u32) -> Self {
        self.min_live_others = live_others;
        self.min_survivors = survivors;
        self
    }

    pub fn id(&self) -> ClientId {
        self.identity.id
    }

    pub fn stage(&self) -> ClientStage {
        self.stage
    }

    pub fn round(&self) -> RoundId {
        self.round
    }

    /// Handles one message from the server and returns the reply, if this stage has one.
    pub fn handle(&mut self, msg: &ServerMessage) -> Result<Option<ClientMessage<W>>, ClientError> {
        let result = self.dispatch(msg);
        self.settle(result)
    }

    /// Provides the quantised local update. Returns the masked input if the shares have already
    /// arrived; otherwise it is sent as soon as they do.
    pub fn set_input(
        &mut self,
        input: QuantisedInput<W>,
    ) -> Result<Option<ClientMessage<W>>, ClientError> {
        let result = self.accept_input(input);
        self.settle(result)
    }

    fn settle(
        &mut self,
        result: Result<Option<ClientMessage<W>>, ClientError>,
    ) -> Result<Option<ClientMessage<W>>, ClientError> {
        if let Err(e) = &result
            && !e.is_benign()
        {
            self.fail();
        }
        result
    }

    fn fail(&mut self) {
        self.stage = ClientStage::Failed;
        self.peers.clear();
        self.cipher_sk = None;
        self.mask_sk = None;
        self.own_shares = None;
        self.input = None;
        self.self_seed.zeroize();
    }

    fn dispatch(&mut self, msg: &ServerMessage) -> Result<Option<ClientMessage<W>>, ClientError> {
        if self.stage == ClientStage::Failed {
            return Err(ClientError::Failed);
        }
        if msg.round() != self.round {
            return Err(ClientError::WrongRound {
                expected: self.round,
                got: msg.round(),
            });
        }
        let consistency = self.params.as_ref().is_some_and(|p| p.consistency_check);
        match (self.stage, msg) {
            (ClientStage::AwaitingSetup, ServerMessage::Setup(m)) => self.on_setup(m).map(Some),
            (ClientStage::AwaitingNeighbourKeys, ServerMessage::NeighbourKeys(m)) => {
                self.on_neighbour_keys(m).map(Some)
            }
            (ClientStage::AwaitingShares, ServerMessage::ForwardedShares(m)) => {
                self.on_forwarded_shares(m)
            }
            (ClientStage::AwaitingSurvivors, ServerMessage::ConsistencyRequest(m))
                if consistency =>
            {
                self.on_consistency_request(m).map(Some)
            }
            (ClientStage::AwaitingSurvivors, ServerMessage::UnmaskRequest(m)) if !consistency => {
                self.on_unmask_request(m).map(Some)
            }
            (ClientStage::AwaitingUnmask, ServerMessage::UnmaskRequest(m)) => {
                self.on_unmask_request(m).map(Some)
            }
            (stage, msg) => Err(ClientError::UnexpectedMessage {
                stage,
                got: msg.name(),
            }),
        }
    }

    fn params(&self) -> Result<&Params, ClientError> {
        self.params.as_ref().ok_or(ClientError::UnexpectedMessage {
            stage: self.stage,
            got: "a message before Setup",
        })
    }

    fn threshold(&self) -> u32 {
        self.params.as_ref().map_or(0, |p| p.threshold)
    }

    /// Every stage needs at least t live sites in this site's neighbourhood, itself included.
    fn require_quorum(&self, live: usize) -> Result<(), ClientError> {
        let threshold = self.threshold();
        if live < threshold as usize {
            return Err(ClientError::TooFewNeighbours {
                stage: self.stage,
                live,
                threshold,
            });
        }
        let others = live.saturating_sub(1);
        if others < self.min_live_others as usize {
            return Err(ClientError::TooFewLive {
                stage: self.stage,
                others,
                required: self.min_live_others,
            });
        }
        Ok(())
    }

    /// The site's floor on survivors: participants of the roster only, each once (the list
    /// is checked sorted and duplicate-free first). With site-level noise the floor is at
    /// least the survivors the noise was sized for: a sum over fewer carries less noise than
    /// the round's guarantee, and an honest site does not reveal the shares that would unmask
    /// it — so the coordinator cannot see such a sum, not merely promise not to use it.
    fn require_survivors(&self, survivors: &[ClientId]) -> Result<(), ClientError> {
        let n = survivors
            .iter()
            .filter(|s| self.roster.contains_key(s))
            .count();
        let noise_floor = self
            .params
            .as_ref()
            .and_then(|p| p.noise)
            .map_or(0, |noise| noise.min_survivors);
        let required = self.min_survivors.max(noise_floor);
        if n < required as usize {
            return Err(ClientError::TooFewSurvivors {
                survivors: n,
                required,
            });
        }
        Ok(())
    }

    fn on_setup(&mut self, m: &Setup) -> Result<ClientMessage<W>, ClientError> {
        m.params.validate()?;
        if m.params.modulus.bits() != W::BITS {
            return Err(ClientError::ModulusMismatch {
                round_bits: m.params.modulus.bits(),
                client_bits: W::BITS,
            });
        }
        if m.participants.len() != m.params.sites as usize {
            return Err(ClientError::ParticipantCount {
                participants: m.participants.len(),
                sites: m.params.sites,
            });
        }
        let roster = check_roster(m)?;
        let me = self.identity.id;
        match roster.get(&me) {
            None => return Err(ClientError::NotAParticipant { id: me }),
            Some(name) if *name != self.identity.name => {
                return Err(ClientError::BadRoster(format!(
                    "it lists this site ({me}) as {name:?}, but this site is {:?}",
                    self.identity.name
                )));
            }
            Some(_) => {}
        }
        if let Some(input) = &self.input
            && input.values.len() != m.params.vector_len()
        {
            return Err(ClientError::InputLength {
                got: input.values.len(),
                expected: m.params.vector_len(),
            });
        }
        let cipher_sk = StaticSecret::from(random_bytes(&mut self.rng));
        let mask_sk = StaticSecret::from(random_bytes(&mut self.rng));
        let cipher_pk = PublicKey::from(&cipher_sk).to_bytes();
        let mask_pk = PublicKey::from(&mask_sk).to_bytes();
        self.self_seed = random_bytes(&mut self.rng);
        let self_commitment = crypto::self_commitment(self.round, me, &self.self_seed);
        let payload = crypto::advertise_payload(
            self.round,
            me,
            &self.identity.name,
            &cipher_pk,
            &mask_pk,
            &self_commitment,
        );
        let signature = crypto::sign(&self.identity.signing_key, &payload);
        self.my_digest = crypto::advertisement_digest(&payload);
        self.params = Some(m.params.clone());
        self.roster = roster;
        self.server_seed = m.graph_seed;
        self.mask_sk = Some(mask_sk);
        self.cipher_sk = Some(cipher_sk);
        self.my_public = (cipher_pk, mask_pk);
        self.stage = ClientStage::AwaitingNeighbourKeys;
        Ok(ClientMessage::AdvertiseKeys(AdvertiseKeys {
            round: self.round,
            sender: me,
            cipher_pk,
            mask_pk,
            self_commitment,
            credential: self.identity.credential.clone(),
            signature,
        }))
    }

    /// Derives the neighbour graph: from the server's seed alone when it is complete (where
    /// the seed changes nothing), otherwise from the server's seed and the digests of every
    /// accepted advertisement, which must include this site's own.
    fn derive_graph(
        &self,
        neighbours: u32,
        complete: bool,
        advertisers: &[(ClientId, [u8; 32])],
    ) -> Result<NeighbourGraph, ClientError> {
        let participants: Vec<ClientId> = self.roster.keys().copied().collect();
        let seed = if complete {
            self.server_seed
        } else {
            self.check_seed_material(advertisers)?;
            crypto::graph_seed(self.round, &self.server_seed, advertisers)
        };
        Ok(NeighbourGraph::new(&participants, neighbours, &seed)?)
    }

    /// The advertiser list must be canonical, list only participants, and hold this site's
    /// own advertisement as this site made it.
    fn check_seed_material(&self, advertisers: &[(ClientId, [u8; 32])]) -> Result<(), ClientError> {
        if advertisers.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(ClientError::SeedMaterial(
                "the advertiser list is not sorted and duplicate-free".into(),
            ));
        }
        if let Some((id, _)) = advertisers
            .iter()
            .find(|(id, _)| !self.roster.contains_key(id))
        {
            return Err(ClientError::SeedMaterial(format!(
                "advertiser {id} is not a participant"
            )));
        }
        let me = self.identity.id;
        match advertisers.binary_search_by_key(&me, |(id, _)| *id) {
            Ok(i) if advertisers[i].1 == self.my_digest => {}
            Ok(_) => {
                return Err(ClientError::SeedMaterial(
                    "this site's advertisement is listed with a digest it did not produce".into(),
                ));
            }
            Err(_) => {
                return Err(ClientError::SeedMaterial(
                    "this site's advertisement is missing from the list".into(),
                ));
            }
        }
        Ok(())
    }

    fn on_neighbour_keys(&mut self, m: &NeighbourKeys) -> Result<ClientMessage<W>, ClientError> {
        let me = self.identity.id;
        let threshold = self.threshold();
        if self.cipher_sk.is_none() || self.mask_sk.is_none() {
            return Err(ClientError::UnexpectedMessage {
                stage: self.stage,
                got: "NeighbourKeys before Setup",
            });
        }
        let params = self.params()?;
        let complete = params.neighbours == params.sites;
        let graph = self.derive_graph(params.neighbours, complete, &m.advertisers)?;
        let digests: BTreeMap<ClientId, [u8; 32]> = m.advertisers.iter().copied().collect();
        let (Some(cipher_sk), Some(mask_sk)) = (self.cipher_sk.take(), self.mask_sk.take()) else {
            return Err(ClientError::Failed);
        };
        let mut seen_keys: BTreeSet<[u8; 32]> = BTreeSet::new();
        seen_keys.insert(self.my_public.0);
        seen_keys.insert(self.my_public.1);
        let mut seen_identities =
            BTreeSet::from([self.identity.signing_key.verifying_key().to_bytes()]);
        let mut peers = BTreeMap::new();
        for k in &m.keys {
            let peer = k.sender;
            if k.round != self.round {
                return Err(ClientError::ReplayedKey { peer });
            }
            if peer == me || !graph.are_neighbours(me, peer) {
                return Err(ClientError::NotANeighbour { peer });
            }
            if peers.contains_key(&peer) {
                return Err(ClientError::Duplicate { peer });
            }
            let name = self
                .roster
                .get(&peer)
                .ok_or(ClientError::NotANeighbour { peer })?;
            let verifying_key = self
                .verifier
                .verify_identity(peer, name, &k.credential)
                .map_err(|reason| ClientError::BadIdentity { peer, reason })?;
            let payload = crypto::advertise_payload(
                self.round,
                peer,
                name,
                &k.cipher_pk,
                &k.mask_pk,
                &k.self_commitment,
            );
            if !crypto::verify(&verifying_key, &payload, &k.signature) {
                return Err(ClientError::BadSignature { peer });
            }
            if !seen_identities.insert(verifying_key.to_bytes()) {
                return Err(ClientError::SharedIdentity { peer });
            }
            if !complete && digests.get(&peer) != Some(&crypto::advertisement_digest(&payload)) {
                return Err(ClientError::SeedMaterial(format!(
                    "site {peer}'s advertisement is not the one the graph seed was derived from"
                )));
            }
            if !seen_keys.insert(k.cipher_pk) || !seen_keys.insert(k.mask_pk) {
                return Err(ClientError::ReusedKey { peer });
            }
            let cipher_secret =
                crypto::agree(&cipher_sk, &k.cipher_pk).ok_or(ClientError::WeakKey { peer })?;
            let mask_secret =
                crypto::agree(&mask_sk, &k.mask_pk).ok_or(ClientError::WeakKey { peer })?;
            peers.insert(
                peer,
                Peer {
                    verifying_key,
                    cipher_secret,
                    mask_secret,
                    shares: None,
                },
            );
        }
        // A neighbour the seed material lists as an advertiser must be here: otherwise the
        // server would be dropping it from this site's view only.
        if !complete
            && let Some(peer) = graph
                .neighbours(me)
                .into_iter()
                .find(|v| *v != me && digests.contains_key(v) && !peers.contains_key(v))
        {
            return Err(ClientError::MissingNeighbourKeys { peer });
        }
        self.graph = Some(graph);
        let live = peers.len() + 1;
        self.require_quorum(live)?;
        // Share the self-mask seed and the mask key among the live neighbourhood, self included.
        let holders: Vec<ClientId> = peers.keys().copied().chain([me]).collect();
        let mut mask_key = mask_sk.to_bytes();
        let b_shares = shamir::share(&self.self_seed, &holders, threshold as usize, &mut self.rng);
        let s_shares = shamir::share(&mask_key, &holders, threshold as usize, &mut self.rng);
        mask_key.zeroize();
        let (b_shares, s_shares) = match (b_shares, s_shares) {
            (Ok(b), Ok(s)) => (b, s),
            // holders are distinct and at least `threshold` by the checks above
            _ => unreachable!("share parameters were validated"),
        };
        let mut shares = Vec::with_capacity(peers.len());
        for ((&holder, b), s) in holders.iter().zip(b_shares).zip(s_shares) {
            match peers.get(&holder) {
                Some(peer) => {
                    let mut plain = [0u8; 2 * SHARE_BYTES];
                    plain[..SHARE_BYTES].copy_from_slice(&b.to_bytes());
                    plain[SHARE_BYTES..].copy_from_slice(&s.to_bytes());
                    let ciphertext =
                        crypto::encrypt_share(&peer.cipher_secret, self.round, me, holder, &plain);
                    plain.zeroize();
                    shares.push(EncryptedShare {
                        peer: holder,
                        ciphertext,
                    });
                }
                None => self.own_shares = Some((b, s)),
            }
        }
        self.peers = peers;
        // Both ephemeral secret keys have done their job (every agreement is computed); they
        // were taken out of `self` above and are zeroised as they go out of scope here.
        drop((cipher_sk, mask_sk));
        self.stage = ClientStage::AwaitingShares;
        let digests: Vec<(ClientId, [u8; 32])> = shares
            .iter()
            .map(|s| (s.peer, crypto::share_digest(&s.ciphertext)))
            .collect();
        let signature = crypto::sign(
            &self.identity.signing_key,
            &crypto::share_list_payload(self.round, me, &digests),
        );
        Ok(ClientMessage::ShareKeys(ShareKeys {
            round: self.round,
            sender: me,
            shares,
            signature,
        }))
    }

    fn on_forwarded_shares(
        &mut self,
        m: &ForwardedShares,
    ) -> Result<Option<ClientMessage<W>>, ClientError> {
        let me = self.identity.id;
        let round = self.round;
        for s in &m.shares {
            let peer = s.peer;
            let Some(p) = self.peers.get_mut(&peer) else {
                return Err(ClientError::NotANeighbour { peer });
            };
            if p.shares.is_some() {
                return Err(ClientError::Duplicate { peer });
            }
            let Some(mut plain) =
                crypto::decrypt_share(&p.cipher_secret, round, peer, me, &s.ciphertext)
            else {
                // Who is at fault: the sender, if this is the share its signed list names
                // for this site (the coordinator checked that signature on receipt);
                // otherwise the coordinator, which changed or invented it.
                let signed = m.lists.iter().find(|l| l.sender == peer).is_some_and(|l| {
                    l.digests
                        .contains(&(me, crypto::share_digest(&s.ciphertext)))
                        && crypto::verify(
                            &p.verifying_key,
                            &crypto::share_list_payload(round, peer, &l.digests),
                            &l.signature,
                        )
                });
                return Err(if signed {
                    ClientError::ShareDecryption { peer }
                } else {
                    ClientError::TamperedShare { peer }
                });
            };
            let parsed = parse_share_pair(&plain);
            plain.zeroize();
            p.shares = Some(parsed.ok_or(ClientError::MalformedShare { peer })?);
        }
        // Neighbours that advertised but never shared are out of the round for this site.
        self.peers.retain(|_, p| p.shares.is_some());
        let live = self.peers.len() + 1;
        self.require_quorum(live)?;
        self.stage = ClientStage::AwaitingInput;
        match self.input.take() {
            Some(input) => self.mask(input).map(Some),
            None => Ok(None),
        }
    }

    fn accept_input(
        &mut self,
        input: QuantisedInput<W>,
    ) -> Result<Option<ClientMessage<W>>, ClientError> {
        match self.stage {
            ClientStage::Failed => return Err(ClientError::Failed),
            ClientStage::AwaitingSetup
            | ClientStage::AwaitingNeighbourKeys
            | ClientStage::AwaitingShares
            | ClientStage::AwaitingInput
                if self.input.is_none() => {}
            stage => {
                return Err(ClientError::UnexpectedMessage {
                    stage,
                    got: "a second input",
                });
            }
        }
        if let Some(p) = &self.params
            && input.values.len() != p.vector_len()
        {
            return Err(ClientError::InputLength {
                got: input.values.len(),
                expected: p.vector_len(),
            });
        }
        if self.stage == ClientStage::AwaitingInput {
            self.mask(input).map(Some)
        } else {
            self.input = Some(input);
            Ok(None)
        }
    }

    /// y = x + PRG(b) + Σ_{v > u} PRG(s_uv) - Σ_{v < u} PRG(s_uv): the pairwise masks cancel in
    /// the sum over any set of sites that includes both ends of every pair.
    fn mask(&mut self, input: QuantisedInput<W>) -> Result<ClientMessage<W>, ClientError> {
        let me = self.identity.id;
        let expected = self.params()?.vector_len();
        if input.values.len() != expected {
            return Err(ClientError::InputLength {
                got: input.values.len(),
                expected,
            });
        }
        let mut values = input.values.clone();
        drop(input);
        apply_mask(
            &mut values,
            &crypto::self_mask_seed(&self.self_seed, self.round, me),
            Sign::Add,
        );
        for (&peer, p) in &self.peers {
            let seed = crypto::pairwise_seed(&p.mask_secret, self.round, me, peer);
            let sign = if me < peer { Sign::Add } else { Sign::Sub };
            apply_mask(&mut values, &seed, sign);
        }
        self.stage = ClientStage::AwaitingSurvivors;
        Ok(ClientMessage::MaskedInput(MaskedInput {
            round: self.round,
            sender: me,
            values,
        }))
    }

    /// Checks a survivor set against what this site knows: canonical, contains this site, has
    /// only neighbours this site masked with, and leaves at least `t` of them.
    fn check_survivors(&self, survivors: &[ClientId]) -> Result<(), ClientError> {
        let me = self.identity.id;
        if survivors.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ClientError::InconsistentSurvivors(
                "the list is not sorted and duplicate-free".into(),
            ));
        }
        if survivors.binary_search(&me).is_err() {
            return Err(ClientError::InconsistentSurvivors(format!(
                "this site ({me}) sent its input but is not listed"
            )));
        }
        let graph = self.graph.as_ref().ok_or(ClientError::Failed)?;
        let mut live = 0;
        for &s in survivors {
            if s == me || self.peers.contains_key(&s) {
                live += 1;
            } else if graph.are_neighbours(me, s) {
                return Err(ClientError::InconsistentSurvivors(format!(
                    "neighbour {s} is listed as a survivor but never shared keys with this site"
                )));
            }
        }
        self.require_quorum(live)?;
        self.require_survivors(survivors)
    }

    fn on_consistency_request(
        &mut self,
        m: &ConsistencyRequest,
    ) -> Result<ClientMessage<W>, ClientError> {
        self.check_survivors(&m.survivors)?;
        let payload = crypto::consistency_payload(self.round, &m.survivors);
        let signature = crypto::sign(&self.identity.signing_key, &payload);
        self.signed_survivors = Some(m.survivors.clone());
        self.stage = ClientStage::AwaitingUnmask;
        Ok(ClientMessage::ConsistencySignature(ConsistencySignature {
            round: self.round,
            sender: self.identity.id,
            signature,
        }))
    }

    fn on_unmask_request(&mut self, m: &UnmaskRequest) -> Result<ClientMessage<W>, ClientError> {
        let me = self.identity.id;
        if let Some(signed) = &self.signed_survivors {
            if *signed != m.survivors {
                return Err(ClientError::SurvivorSetChanged);
            }
            // At least t neighbours (this site included) must have signed the same set, so the
            // server cannot have shown different sets to different neighbours.
            let payload = crypto::consistency_payload(self.round, &m.survivors);
            let mut signers = BTreeSet::from([me]);
            for (signer, signature) in &m.signatures {
                let Some(p) = self.peers.get(signer) else {
                    return Err(ClientError::NotANeighbour { peer: *signer });
                };
                if m.survivors.binary_search(signer).is_err() {
                    return Err(ClientError::InconsistentSurvivors(format!(
                        "site {signer} signed but is not a survivor"
                    )));
                }
                if !crypto::verify(&p.verifying_key, &payload, signature) {
                    return Err(ClientError::BadSignature { peer: *signer });
                }
                signers.insert(*signer);
            }
            self.require_quorum(signers.len())?;
            self.require_survivors(&m.survivors)?;
        } else {
            self.check_survivors(&m.survivors)?;
        }
        if m.dropped.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ClientError::InconsistentSurvivors(
                "the dropped list is not sorted and duplicate-free".into(),
            ));
        }
        if m.dropped.binary_search(&me).is_ok() {
            return Err(ClientError::BothSharesRequested { peer: me });
        }
        let mut revealed = Vec::with_capacity(self.peers.len() + 1);
        if let Some((b, _)) = &self.own_shares {
            revealed.push(RevealedShare {
                owner: me,
                kind: ShareKind::SelfMaskSeed,
                share: b.clone(),
            });
        }
        for (&peer, p) in &self.peers {
            let survived = m.survivors.binary_search(&peer).is_ok();
            let dropped = m.dropped.binary_search(&peer).is_ok();
            let Some((b, s)) = &p.shares else {
                continue;
            };
            let (kind, share) = match (survived, dropped) {
                (true, true) => return Err(ClientError::BothSharesRequested { peer }),
                (true, false) => (ShareKind::SelfMaskSeed, b.clone()),
                (false, true) => (ShareKind::MaskKey, s.clone()),
                (false, false) => return Err(ClientError::IncompleteUnmaskRequest { peer }),
            };
            revealed.push(RevealedShare {
                owner: peer,
                kind,
                share,
            });
        }
        // Nothing secret is needed any more: forget it before answering.
        self.peers.clear();
        self.own_shares = None;
        self.self_seed.zeroize();
        self.stage = ClientStage::Done;
        Ok(ClientMessage::UnmaskShares(UnmaskShares {
            round: self.round,
            sender: me,
            shares: revealed,
        }))
    }
}

fn random_bytes(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

fn parse_share_pair(plain: &[u8]) -> Option<(Share, Share)> {
    if plain.len() != 2 * SHARE_BYTES {
        return None;
    }
    let mut b = [0u8; SHARE_BYTES];
    let mut s = [0u8; SHARE_BYTES];
    b.copy_from_slice(&plain[..SHARE_BYTES]);
    s.copy_from_slice(&plain[SHARE_BYTES..]);
    let out = Share::from_bytes(&b).ok().zip(Share::from_bytes(&s).ok());
    b.zeroize();
    s.zeroize();
    out
}

/// The roster must name every participant once, with distinct non-empty names, never the
/// coordinator: otherwise one site's certificate could stand for two ids, or the coordinator's
/// for a site.
fn check_roster(m: &Setup) -> Result<BTreeMap<ClientId, String>, ClientError> {
    if m.participants.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ClientError::BadRoster(
            "the participants are not sorted and distinct".into(),
        ));
    }
    if m.names.len() != m.participants.len() {
        return Err(ClientError::BadRoster(format!(
            "{} names for {} participants",
            m.names.len(),
            m.participants.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for name in &m.names {
        if name.is_empty() {
            return Err(ClientError::BadRoster("an empty site name".into()));
        }
        if name == COORDINATOR_COMMON_NAME {
            return Err(ClientError::BadRoster(format!(
                "it lists {name:?}, the coordinator, as a site"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(ClientError::BadRoster(format!("{name:?} is listed twice")));
        }
    }
    Ok(m.participants
        .iter()
        .copied()
        .zip(m.names.iter().cloned())
        .collect())
}
