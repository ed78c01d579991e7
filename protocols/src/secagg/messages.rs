//! The protocol's messages and their compact, versioned byte encoding.
//!
//! Layout of every message: `"CSA"`, a version byte, a tag byte, then the fields in order;
//! integers little-endian, lists as a u32 count followed by the items. The decoder is strict:
//! it checks every length against the bytes that are actually there before allocating
//! (a hostile count cannot make it reserve gigabytes), rejects values that cannot occur
//! (non-canonical booleans, shares outside the field, an element width that is not the round's),
//! and rejects trailing bytes.

use thiserror::Error;

use super::params::{Modulus, Noise, Params};
use super::shamir::{SHARE_BYTES, Share};
use super::word::Word;
use super::{ClientId, RoundId};

const MAGIC: &[u8; 3] = b"CSA";
/// Version of the encoding. Bumped on any incompatible change; decoders refuse other versions.
pub const VERSION: u8 = 5;
/// A [`RoundId`] on the wire: round, attempt, context.
const ROUND_BYTES: usize = 8 + 4 + 32;
const HEADER: usize = 5;

/// Upper bound for an identity credential (a certificate chain comfortably fits).
pub const MAX_CREDENTIAL: usize = 16 * 1024;
/// Upper bound for a site name in the roster (a DNS name's length).
pub const MAX_SITE_NAME: usize = 253;
/// Size of an encrypted share: two 40-byte shares plus the 16-byte GCM tag.
pub const SHARE_CIPHERTEXT_BYTES: usize = 2 * SHARE_BYTES + 16;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated message: {what} needs {needed} bytes, {remaining} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        remaining: usize,
    },
    #[error("{extra} unexpected bytes after the end of the message")]
    TrailingBytes { extra: usize },
    #[error("not a Cohort SecAgg message (bad magic)")]
    BadMagic,
    #[error("unsupported encoding version {got} (this build speaks version {VERSION})")]
    UnsupportedVersion { got: u8 },
    #[error("unknown message tag {tag:#04x} for a {direction} message")]
    UnknownTag { tag: u8, direction: &'static str },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// Public per-round set-up, sent by the server to every selected site.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub round: RoundId,
    pub params: Params,
    /// The server's part of the neighbour-graph seed; the sites' advertisements are the rest
    /// (see [`NeighbourKeys::advertisers`]).
    pub graph_seed: [u8; 32],
    /// Sorted, one per site.
    pub participants: Vec<ClientId>,
    /// The roster: the site name of each participant, in the order of `participants`. Every
    /// site checks each peer's certificate against its entry here.
    pub names: Vec<String>,
}

impl Setup {
    /// The set-up a server started with these inputs sends: participants sorted by id, each
    /// name in its participant's place. What a caller needs to know the set-up before the
    /// server exists (the round context is computed from it) without building one.
    pub fn new(
        round: RoundId,
        params: Params,
        graph_seed: [u8; 32],
        roster: &[(ClientId, String)],
    ) -> Setup {
        let names: std::collections::BTreeMap<ClientId, &String> =
            roster.iter().map(|(id, name)| (*id, name)).collect();
        Setup {
            round,
            params,
            graph_seed,
            participants: names.keys().copied().collect(),
            names: names.values().map(|n| (*n).clone()).collect(),
        }
    }
}

/// A site's two ephemeral X25519 public keys, signed with its identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub round: RoundId,
    pub sender: ClientId,
    /// Key for encrypting shares between sites.
    pub cipher_pk: [u8; 32],
    /// Key for pairwise mask agreement; its secret half is reconstructed if the site drops.
    pub mask_pk: [u8; 32],
    /// Hash of the site's self-mask seed, checked against the seed the server reconstructs.
    pub self_commitment: [u8; 32],
    /// Proof of identity checked by an [`super::IdentityVerifier`].
    pub credential: Vec<u8>,
    pub signature: [u8; 64],
}

impl AdvertiseKeys {
    /// The bytes the signature covers, for the site listed in the roster as `name`.
    pub fn signed_payload(&self, name: &str) -> Vec<u8> {
        super::crypto::advertise_payload(
            self.round,
            self.sender,
            name,
            &self.cipher_pk,
            &self.mask_pk,
            &self.self_commitment,
        )
    }
}

/// The advertised keys of a site's neighbours, forwarded by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourKeys {
    pub round: RoundId,
    pub keys: Vec<AdvertiseKeys>,
    /// Every site whose advertisement the server accepted, with the digest of that
    /// advertisement, sorted by id: with the server's seed, what the graph seed is derived from.
    /// Empty when the graph is complete (neighbours = sites), where no seed matters.
    pub advertisers: Vec<(ClientId, [u8; 32])>,
}

/// One encrypted pair of shares. `peer` is the recipient when a site sends it and the sender
/// when the server forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    pub peer: ClientId,
    pub ciphertext: Vec<u8>,
}

/// A sender's signed list of the shares it sent: (recipient, SHA-256 of the ciphertext), in
/// message order. The coordinator checks the signature when the shares arrive and forwards
/// the list with them, so a recipient whose share does not decrypt can tell which side is at
/// fault: a share that matches a list its sender signed is the sender's own doing; anything
/// else was changed by the coordinator (which, if honest, would have refused an unsigned
/// list). Recipients only look at it when a share fails, so honest rounds pay one signature
/// per site and one verification per site at the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedShareList {
    pub sender: ClientId,
    pub digests: Vec<(ClientId, [u8; 32])>,
    pub signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKeys {
    pub round: RoundId,
    pub sender: ClientId,
    pub shares: Vec<EncryptedShare>,
    /// The sender's signature over its share list (see [`SignedShareList`]).
    pub signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedShares {
    pub round: RoundId,
    pub shares: Vec<EncryptedShare>,
    /// The signed list of every sender whose share is in `shares`.
    pub lists: Vec<SignedShareList>,
}

/// The masked vector `y_u = x_u + PRG(b_u) + Σ ±PRG(s_uv)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput<W: Word> {
    pub round: RoundId,
    pub sender: ClientId,
    pub values: Vec<W>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyRequest {
    pub round: RoundId,
    pub survivors: Vec<ClientId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencySignature {
    pub round: RoundId,
    pub sender: ClientId,
    pub signature: [u8; 64],
}

/// Which shares the server asks a site to reveal: self-mask seeds of `survivors`, mask keys
/// of `dropped`. With the consistency check on, `signatures` carries the neighbours'
/// signatures over the survivor set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub round: RoundId,
    pub survivors: Vec<ClientId>,
    pub dropped: Vec<ClientId>,
    pub signatures: Vec<(ClientId, [u8; 64])>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareKind {
    /// Share of `b_u`, revealed for sites whose masked input was received.
    SelfMaskSeed,
    /// Share of the mask secret key, revealed for sites that dropped before sending input.
    MaskKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealedShare {
    pub owner: ClientId,
    pub kind: ShareKind,
    pub share: Share,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskShares {
    pub round: RoundId,
    pub sender: ClientId,
    pub shares: Vec<RevealedShare>,
}

/// Everything the server sends to a site.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Setup(Setup),
    NeighbourKeys(NeighbourKeys),
    ForwardedShares(ForwardedShares),
    ConsistencyRequest(ConsistencyRequest),
    UnmaskRequest(UnmaskRequest),
}

/// Everything a site sends to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<W: Word> {
    AdvertiseKeys(AdvertiseKeys),
    ShareKeys(ShareKeys),
    MaskedInput(MaskedInput<W>),
    ConsistencySignature(ConsistencySignature),
    UnmaskShares(UnmaskShares),
}

impl ServerMessage {
    pub fn round(&self) -> RoundId {
        match self {
            ServerMessage::Setup(m) => m.round,
            ServerMessage::NeighbourKeys(m) => m.round,
            ServerMessage::ForwardedShares(m) => m.round,
            ServerMessage::ConsistencyRequest(m) => m.round,
            ServerMessage::UnmaskRequest(m) => m.round,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ServerMessage::Setup(_) => "Setup",
            ServerMessage::NeighbourKeys(_) => "NeighbourKeys",
            ServerMessage::ForwardedShares(_) => "ForwardedShares",
            ServerMessage::ConsistencyRequest(_) => "ConsistencyRequest",
            ServerMessage::UnmaskRequest(_) => "UnmaskRequest",
        }
    }
}

impl<W: Word> ClientMessage<W> {
    pub fn round(&self) -> RoundId {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.round,
            ClientMessage::ShareKeys(m) => m.round,
            ClientMessage::MaskedInput(m) => m.round,
            ClientMessage::ConsistencySignature(m) => m.round,
            ClientMessage::UnmaskShares(m) => m.round,
        }
    }

    pub fn sender(&self) -> ClientId {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.sender,
            ClientMessage::ShareKeys(m) => m.sender,
            ClientMessage::MaskedInput(m) => m.sender,
            ClientMessage::ConsistencySignature(m) => m.sender,
            ClientMessage::UnmaskShares(m) => m.sender,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ClientMessage::AdvertiseKeys(_) => "AdvertiseKeys",
            ClientMessage::ShareKeys(_) => "ShareKeys",
            ClientMessage::MaskedInput(_) => "MaskedInput",
            ClientMessage::ConsistencySignature(_) => "ConsistencySignature",
            ClientMessage::UnmaskShares(_) => "UnmaskShares",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

mod tag {
    pub const SETUP: u8 = 0x01;
    pub const NEIGHBOUR_KEYS: u8 = 0x02;
    pub const FORWARDED_SHARES: u8 = 0x03;
    pub const CONSISTENCY_REQUEST: u8 = 0x04;
    pub const UNMASK_REQUEST: u8 = 0x05;
    pub const ADVERTISE_KEYS: u8 = 0x11;
    pub const SHARE_KEYS: u8 = 0x12;
    pub const MASKED_INPUT: u8 = 0x13;
    pub const CONSISTENCY_SIGNATURE: u8 = 0x14;
    pub const UNMASK_SHARES: u8 = 0x15;
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(tag: u8, capacity: usize) -> Self {
        let mut v = Vec::with_capacity(capacity);
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        v.push(tag);
        Writer(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn len_prefixed(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.bytes(b);
    }
    fn round(&mut self, r: RoundId) {
        r.write(&mut self.0);
    }
    fn ids(&mut self, ids: &[ClientId]) {
        self.u32(ids.len() as u32);
        for &id in ids {
            self.u32(id);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                remaining: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Invalid {
                what,
                detail: format!("boolean byte {v}, expected 0 or 1"),
            }),
        }
    }
    fn round(&mut self) -> Result<RoundId, DecodeError> {
        Ok(RoundId {
            round: self.u64("round")?,
            attempt: self.u32("attempt")?,
            context: self.array("round context")?,
        })
    }
    /// A list count, checked against the bytes left so a forged count cannot force a huge
    /// allocation.
    fn count(&mut self, item_bytes: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        let needed = n.saturating_mul(item_bytes);
        if needed > self.remaining() {
            return Err(DecodeError::Truncated {
                what,
                needed,
                remaining: self.remaining(),
            });
        }
        Ok(n)
    }
    fn len_prefixed(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.count(1, what)?;
        if n > max {
            return Err(DecodeError::Invalid {
                what,
                detail: format!("{n} bytes, at most {max} allowed"),
            });
        }
        self.take(n, what)
    }
    fn ids(&mut self, what: &'static str) -> Result<Vec<ClientId>, DecodeError> {
        let n = self.count(4, what)?;
        (0..n).map(|_| self.u32(what)).collect()
    }
    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { extra }),
        }
    }
}

fn open(bytes: &[u8]) -> Result<(u8, Reader<'_>), DecodeError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(3, "magic")? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { got: version });
    }
    let tag = r.u8("tag")?;
    Ok((tag, r))
}

fn write_params(w: &mut Writer, p: &Params) {
    w.u32(p.sites);
    w.u32(p.neighbours);
    w.u32(p.threshold);
    w.u32(p.dim);
    w.u32(p.clip.to_bits());
    w.u8(p.quant_bits as u8);
    w.u8(p.modulus.bits() as u8);
    w.u64(p.max_weight);
    w.u8(p.consistency_check as u8);
    match p.noise {
        None => w.u8(0),
        Some(n) => {
            w.u8(1);
            w.u64(n.sigma.to_bits());
            w.u32(n.min_survivors);
        }
    }
    match p.norm_bound {
        None => w.u8(0),
        Some(b) => {
            w.u8(1);
            w.u32(b.to_bits());
        }
    }
}

/// The fixed part of the parameters; noise, when present, adds 12 bytes, a norm bound 4.
const PARAMS_BYTES: usize = 4 * 5 + 1 + 1 + 8 + 1 + 1 + 1;

fn read_params(r: &mut Reader<'_>) -> Result<Params, DecodeError> {
    let sites = r.u32("params.sites")?;
    let neighbours = r.u32("params.neighbours")?;
    let threshold = r.u32("params.threshold")?;
    let dim = r.u32("params.dim")?;
    let clip = f32::from_bits(r.u32("params.clip")?);
    let quant_bits = r.u8("params.quant_bits")? as u32;
    let bits = r.u8("params.modulus")?;
    let modulus = Modulus::from_bits(bits as u32).ok_or_else(|| DecodeError::Invalid {
        what: "params.modulus",
        detail: format!("2^{bits}, expected 2^32 or 2^64"),
    })?;
    Ok(Params {
        sites,
        neighbours,
        threshold,
        dim,
        clip,
        quant_bits,
        modulus,
        max_weight: r.u64("params.max_weight")?,
        consistency_check: r.bool("params.consistency_check")?,
        noise: match r.u8("params.noise")? {
            0 => None,
            1 => Some(Noise {
                sigma: f64::from_bits(r.u64("params.noise.sigma")?),
                min_survivors: r.u32("params.noise.min_survivors")?,
            }),
            other => {
                return Err(DecodeError::Invalid {
                    what: "params.noise",
                    detail: format!("kind {other}, expected 0 (none) or 1 (discrete Gaussian)"),
                });
            }
        },
        norm_bound: match r.u8("params.norm_bound")? {
            0 => None,
            1 => Some(f32::from_bits(r.u32("params.norm_bound")?)),
            other => {
                return Err(DecodeError::Invalid {
                    what: "params.norm_bound",
                    detail: format!("flag {other}, expected 0 or 1"),
                });
            }
        },
    })
}

const ADVERTISE_FIXED: usize = ROUND_BYTES + 4 + 32 + 32 + 32 + 4 + 64;

fn write_advertise(w: &mut Writer, m: &AdvertiseKeys) {
    w.round(m.round);
    w.u32(m.sender);
    w.bytes(&m.cipher_pk);
    w.bytes(&m.mask_pk);
    w.bytes(&m.self_commitment);
    w.len_prefixed(&m.credential);
    w.bytes(&m.signature);
}

fn read_advertise(r: &mut Reader<'_>) -> Result<AdvertiseKeys, DecodeError> {
    Ok(AdvertiseKeys {
        round: r.round()?,
        sender: r.u32("sender")?,
        cipher_pk: r.array("cipher_pk")?,
        mask_pk: r.array("mask_pk")?,
        self_commitment: r.array("self_commitment")?,
        credential: r.len_prefixed(MAX_CREDENTIAL, "credential")?.to_vec(),
        signature: r.array("signature")?,
    })
}

fn write_shares(w: &mut Writer, shares: &[EncryptedShare]) {
    w.u32(shares.len() as u32);
    for s in shares {
        w.u32(s.peer);
        w.bytes(&s.ciphertext);
    }
}

fn write_lists(w: &mut Writer, lists: &[SignedShareList]) {
    w.u32(lists.len() as u32);
    for l in lists {
        w.u32(l.sender);
        w.u32(l.digests.len() as u32);
        for (id, d) in &l.digests {
            w.u32(*id);
            w.bytes(d);
        }
        w.bytes(&l.signature);
    }
}

fn read_lists(r: &mut Reader<'_>) -> Result<Vec<SignedShareList>, DecodeError> {
    let n = r.count(4 + 4 + 64, "share lists")?;
    (0..n)
        .map(|_| {
            let sender = r.u32("share list sender")?;
            let k = r.count(36, "share digests")?;
            let digests = (0..k)
                .map(|_| Ok((r.u32("share digest recipient")?, r.array("share digest")?)))
                .collect::<Result<_, DecodeError>>()?;
            Ok(SignedShareList {
                sender,
                digests,
                signature: r.array("share list signature")?,
            })
        })
        .collect()
}

fn read_shares(r: &mut Reader<'_>) -> Result<Vec<EncryptedShare>, DecodeError> {
    let n = r.count(4 + SHARE_CIPHERTEXT_BYTES, "encrypted shares")?;
    (0..n)
        .map(|_| {
            Ok(EncryptedShare {
                peer: r.u32("share peer")?,
                ciphertext: r.take(SHARE_CIPHERTEXT_BYTES, "share ciphertext")?.to_vec(),
            })
        })
        .collect()
}

impl ServerMessage {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerMessage::Setup(m) => {
                let mut w = Writer::new(tag::SETUP, HEADER + 64 + 4 * m.participants.len());
                w.round(m.round);
                write_params(&mut w, &m.params);
                w.bytes(&m.graph_seed);
                w.ids(&m.participants);
                w.u32(m.names.len() as u32);
                for name in &m.names {
                    w.len_prefixed(name.as_bytes());
                }
                w.0
            }
            ServerMessage::NeighbourKeys(m) => {
                let mut w = Writer::new(tag::NEIGHBOUR_KEYS, HEADER + 16 + 200 * m.keys.len());
                w.round(m.round);
                w.u32(m.keys.len() as u32);
                for k in &m.keys {
                    write_advertise(&mut w, k);
                }
                w.u32(m.advertisers.len() as u32);
                for (id, digest) in &m.advertisers {
                    w.u32(*id);
                    w.bytes(digest);
                }
                w.0
            }
            ServerMessage::ForwardedShares(m) => {
                let digests: usize = m.lists.iter().map(|l| 72 + 36 * l.digests.len()).sum();
                let mut w = Writer::new(
                    tag::FORWARDED_SHARES,
                    HEADER + 20 + 100 * m.shares.len() + digests,
                );
                w.round(m.round);
                write_shares(&mut w, &m.shares);
                write_lists(&mut w, &m.lists);
                w.0
            }
            ServerMessage::ConsistencyRequest(m) => {
                let mut w = Writer::new(
                    tag::CONSISTENCY_REQUEST,
                    HEADER + 16 + 4 * m.survivors.len(),
                );
                w.round(m.round);
                w.ids(&m.survivors);
                w.0
            }
            ServerMessage::UnmaskRequest(m) => {
                let mut w = Writer::new(tag::UNMASK_REQUEST, HEADER + 32 + 4 * m.survivors.len());
                w.round(m.round);
                w.ids(&m.survivors);
                w.ids(&m.dropped);
                w.u32(m.signatures.len() as u32);
                for (id, sig) in &m.signatures {
                    w.u32(*id);
                    w.bytes(sig);
                }
                w.0
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (t, mut r) = open(bytes)?;
        let msg = match t {
            tag::SETUP => ServerMessage::Setup(Setup {
                round: r.round()?,
                params: {
                    if r.remaining() < PARAMS_BYTES {
                        return Err(DecodeError::Truncated {
                            what: "params",
                            needed: PARAMS_BYTES,
                            remaining: r.remaining(),
                        });
                    }
                    read_params(&mut r)?
                },
                graph_seed: r.array("graph_seed")?,
                participants: r.ids("participants")?,
                names: {
                    let n = r.count(4, "names")?;
                    (0..n)
                        .map(|_| {
                            let bytes = r.len_prefixed(MAX_SITE_NAME, "site name")?;
                            String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid {
                                what: "site name",
                                detail: "not UTF-8".into(),
                            })
                        })
                        .collect::<Result<_, _>>()?
                },
            }),
            tag::NEIGHBOUR_KEYS => {
                let round = r.round()?;
                let n = r.count(ADVERTISE_FIXED, "neighbour keys")?;
                let keys = (0..n)
                    .map(|_| read_advertise(&mut r))
                    .collect::<Result<_, _>>()?;
                let n = r.count(36, "advertisers")?;
                let advertisers = (0..n)
                    .map(|_| Ok((r.u32("advertiser")?, r.array("advertisement digest")?)))
                    .collect::<Result<_, DecodeError>>()?;
                ServerMessage::NeighbourKeys(NeighbourKeys {
                    round,
                    keys,
                    advertisers,
                })
            }
            tag::FORWARDED_SHARES => ServerMessage::ForwardedShares(ForwardedShares {
                round: r.round()?,
                shares: read_shares(&mut r)?,
                lists: read_lists(&mut r)?,
            }),
            tag::CONSISTENCY_REQUEST => ServerMessage::ConsistencyRequest(ConsistencyRequest {
                round: r.round()?,
                survivors: r.ids("survivors")?,
            }),
            tag::UNMASK_REQUEST => {
                let round = r.round()?;
                let survivors = r.ids("survivors")?;
                let dropped = r.ids("dropped")?;
                let n = r.count(68, "signatures")?;
                let signatures = (0..n)
                    .map(|_| Ok((r.u32("signer")?, r.array("signature")?)))
                    .collect::<Result<_, DecodeError>>()?;
                ServerMessage::UnmaskRequest(UnmaskRequest {
                    round,
                    survivors,
                    dropped,
                    signatures,
                })
            }
            other => {
                return Err(DecodeError::UnknownTag {
                    tag: other,
                    direction: "server",
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Bytes before the values of an encoded [`MaskedInput`]: header, round, sender, element
/// width and count.
pub const MASKED_INPUT_PREFIX: usize = HEADER + ROUND_BYTES + 4 + 1 + 4;

/// The fixed part of an encoded [`MaskedInput`], decoded on its own so that a streamed upload
/// is checked — and can be refused — before a single value reaches the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskedInputPrefix {
    pub round: RoundId,
    pub sender: ClientId,
    /// Bytes per element.
    pub width: usize,
    pub count: usize,
}

impl MaskedInputPrefix {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (t, mut r) = open(bytes)?;
        if t != tag::MASKED_INPUT {
            return Err(DecodeError::Invalid {
                what: "message tag",
                detail: format!(
                    "{t:#04x}, an upload must be a MaskedInput ({:#04x})",
                    tag::MASKED_INPUT
                ),
            });
        }
        let prefix = MaskedInputPrefix {
            round: r.round()?,
            sender: r.u32("sender")?,
            width: r.u8("element width")? as usize,
            count: r.u32("masked values")? as usize,
        };
        r.finish()?;
        Ok(prefix)
    }
}

impl<W: Word> ClientMessage<W> {
    /// Exact size of [`Self::encode`]'s output, without encoding (used to account bandwidth).
    pub fn encoded_len(&self) -> usize {
        HEADER
            + match self {
                ClientMessage::AdvertiseKeys(m) => ADVERTISE_FIXED + m.credential.len(),
                ClientMessage::ShareKeys(m) => {
                    ROUND_BYTES + 4 + 4 + m.shares.len() * (4 + SHARE_CIPHERTEXT_BYTES) + 64
                }
                ClientMessage::MaskedInput(m) => {
                    ROUND_BYTES + 4 + 1 + 4 + m.values.len() * W::BYTES
                }
                ClientMessage::ConsistencySignature(_) => ROUND_BYTES + 4 + 64,
                ClientMessage::UnmaskShares(m) => {
                    ROUND_BYTES + 4 + 4 + m.shares.len() * (5 + SHARE_BYTES)
                }
            }
    }

    pub fn encode(&self) -> Vec<u8> {
        let cap = self.encoded_len();
        match self {
            ClientMessage::AdvertiseKeys(m) => {
                let mut w = Writer::new(tag::ADVERTISE_KEYS, cap);
                write_advertise(&mut w, m);
                w.0
            }
            ClientMessage::ShareKeys(m) => {
                let mut w = Writer::new(tag::SHARE_KEYS, cap);
                w.round(m.round);
                w.u32(m.sender);
                write_shares(&mut w, &m.shares);
                w.bytes(&m.signature);
                w.0
            }
            ClientMessage::MaskedInput(m) => {
                let mut w = Writer::new(tag::MASKED_INPUT, cap);
                w.round(m.round);
                w.u32(m.sender);
                w.u8(W::BYTES as u8);
                w.u32(m.values.len() as u32);
                for v in &m.values {
                    v.write_le(&mut w.0);
                }
                w.0
            }
            ClientMessage::ConsistencySignature(m) => {
                let mut w = Writer::new(tag::CONSISTENCY_SIGNATURE, cap);
                w.round(m.round);
                w.u32(m.sender);
                w.bytes(&m.signature);
                w.0
            }
            ClientMessage::UnmaskShares(m) => {
                let mut w = Writer::new(tag::UNMASK_SHARES, cap);
                w.round(m.round);
                w.u32(m.sender);
                w.u32(m.shares.len() as u32);
                for s in &m.shares {
                    w.u32(s.owner);
                    w.u8(match s.kind {
                        ShareKind::SelfMaskSeed => 0,
                        ShareKind::MaskKey => 1,
                    });
                    w.bytes(&s.share.to_bytes());
                }
                w.0
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (t, mut r) = open(bytes)?;
        let msg = match t {
            tag::ADVERTISE_KEYS => ClientMessage::AdvertiseKeys(read_advertise(&mut r)?),
            tag::SHARE_KEYS => ClientMessage::ShareKeys(ShareKeys {
                round: r.round()?,
                sender: r.u32("sender")?,
                shares: read_shares(&mut r)?,
                signature: r.array("share list signature")?,
            }),
            tag::MASKED_INPUT => {
                let round = r.round()?;
                let sender = r.u32("sender")?;
                let width = r.u8("element width")? as usize;
                if width != W::BYTES {
                    return Err(DecodeError::Invalid {
                        what: "element width",
                        detail: format!(
                            "{width}-byte elements, this round uses modulus 2^{} ({}-byte elements)",
                            W::BITS,
                            W::BYTES
                        ),
                    });
                }
                let n = r.count(W::BYTES, "masked values")?;
                let raw = r.take(n * W::BYTES, "masked values")?;
                let values = raw.chunks_exact(W::BYTES).map(W::read_le).collect();
                ClientMessage::MaskedInput(MaskedInput {
                    round,
                    sender,
                    values,
                })
            }
            tag::CONSISTENCY_SIGNATURE => {
                ClientMessage::ConsistencySignature(ConsistencySignature {
                    round: r.round()?,
                    sender: r.u32("sender")?,
                    signature: r.array("signature")?,
                })
            }
            tag::UNMASK_SHARES => {
                let round = r.round()?;
                let sender = r.u32("sender")?;
                let n = r.count(5 + SHARE_BYTES, "revealed shares")?;
                let shares = (0..n)
                    .map(|_| {
                        let owner = r.u32("share owner")?;
                        let kind = match r.u8("share kind")? {
                            0 => ShareKind::SelfMaskSeed,
                            1 => ShareKind::MaskKey,
                            k => {
                                return Err(DecodeError::Invalid {
                                    what: "share kind",
                                    detail: format!("{k}, expected 0 or 1"),
                                });
                            }
                        };
                        let share = Share::from_bytes(&r.array("share")?).map_err(|e| {
                            DecodeError::Invalid {
                                what: "share",
                                detail: e.to_string(),
                            }
                        })?;
                        Ok(RevealedShare { owner, kind, share })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                ClientMessage::UnmaskShares(UnmaskShares {
                    round,
                    sender,
                    shares,
                })
            }
            other => {
                return Err(DecodeError::UnknownTag {
                    tag: other,
                    direction: "client",
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}
