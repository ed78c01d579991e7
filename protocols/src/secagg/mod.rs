//! SecAgg+ secure aggregation as sans-IO state machines.
//!
//! Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
//! Learning") with the sparse neighbour graph of Bell et al. 2020 (SecAgg+). A [`Client`] and a
//! [`Server`] consume typed messages and return typed messages; they never touch a socket, a
//! file or a clock (time is an argument), and all randomness comes from a seed, so any run —
//! including any bug — replays exactly as a unit test.
//!
//! Stages: setup → advertise keys → share keys → masked input → (consistency check) → unmask.
//! The server only ever holds one accumulator of `d + 2` elements, whatever the number of
//! sites (uploads are added while they stream in, range by range), and learns nothing but the sum of the survivors' quantised vectors.
//!
//! See `docs/ARCHITECTURE.md` for the protocol walk-through and the security argument.

pub mod accumulator;
mod client;
mod crypto;
mod graph;
mod messages;
mod params;
mod prg;
pub mod quant;
mod server;
pub mod shamir;
mod upload;
mod word;

pub use client::{Client, ClientError, ClientStage};
pub use crypto::{
    IdentityVerifier, PinnedIdentities, SiteIdentity, pinned_name, pinned_roster, share_digest,
    sign_share_list,
};
pub use graph::{GraphError, NeighbourGraph};
pub use messages::{
    AdvertiseKeys, ClientMessage, ConsistencyRequest, ConsistencySignature, DecodeError,
    EncryptedShare, ForwardedShares, MASKED_INPUT_PREFIX, MaskedInput, MaskedInputPrefix,
    NeighbourKeys, RevealedShare, ServerMessage, Setup, ShareKeys, ShareKind, SignedShareList,
    UnmaskRequest, UnmaskShares, VERSION,
};
pub use params::{MAX_DIM, Modulus, NOISE_TAIL, Noise, ParamError, Params};
pub use prg::{MaskCipher, MaskSeed, MaskStream, Sign, apply_mask, keystream};
pub use quant::{
    Aggregate, ClipReport, Dequantiser, QuantError, QuantisedInput, central_release, dequantise,
    next_clip, quantise,
};
pub use server::{
    Abort, AbortReason, Output, Poll, RejectReason, Rejection, Server, ServerStage, StageTimeouts,
};
pub use upload::InputSlot;
pub use word::{Word, add_assign};

/// A site's number within a round. The driver maps its authenticated identity (the mTLS
/// certificate) to this id; the protocol never trusts an id a message claims for itself
/// without checking it against that mapping.
pub type ClientId = u32;

/// Identifies one attempt of one round, and what the round is about. A retried round gets a
/// new attempt number, and every key, mask and ciphertext is derived with it, so nothing from a
/// failed attempt can be reused.
///
/// `context` is a digest of what every participant must agree on for the round to mean the
/// same thing to all of them (today: the federation manifest each site trusts). Each site
/// builds its `RoundId` from its own view, never from the server's say-so, and every
/// signature, hash and ciphertext of the round covers it: a server that shows two sites
/// different contexts gets advertisements that do not verify, so the equivocation shows as a
/// refused round instead of a quiet attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoundId {
    pub round: u64,
    pub attempt: u32,
    pub context: [u8; 32],
}

impl RoundId {
    /// A round with no context (all zeros): tests, benchmarks and sites without a manifest.
    pub fn new(round: u64, attempt: u32) -> Self {
        RoundId {
            round,
            attempt,
            context: [0; 32],
        }
    }

    pub fn with_context(self, context: [u8; 32]) -> Self {
        RoundId { context, ..self }
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&self.context);
    }
}

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "round {} attempt {}", self.round, self.attempt)?;
        if self.context != [0; 32] {
            write!(f, " (context ")?;
            for b in &self.context[..4] {
                write!(f, "{b:02x}")?;
            }
            write!(f, "…)")?;
        }
        Ok(())
    }
}

/// Milliseconds on the driver's monotonic clock. The state machines only compare instants.
pub type Millis = u64;
