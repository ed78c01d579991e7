//! A deterministic in-memory network for SecAgg+ tests: N clients and one server, with sites
//! that vanish at chosen stages. Shared by the protocol tests (included with `mod harness`).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cohort_protocols::secagg::*;
use ed25519_dalek::SigningKey;

/// The stage before which a site vanishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropAt {
    /// Never advertises keys.
    Advertise = 0,
    /// Advertises, never shares keys.
    ShareKeys = 1,
    /// Shares keys, never sends its masked input.
    MaskedInput = 2,
    /// Sends its input, never signs the survivor set.
    Consistency = 3,
    /// Never reveals its shares.
    Unmask = 4,
}

pub fn identities(ids: &[ClientId], seed: u64) -> (Vec<SiteIdentity>, Arc<PinnedIdentities>) {
    let keys: Vec<(ClientId, SigningKey)> = ids
        .iter()
        .map(|&id| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&seed.to_le_bytes());
            b[8..12].copy_from_slice(&id.to_le_bytes());
            b[31] = 0x5a;
            (id, SigningKey::from_bytes(&b))
        })
        .collect();
    let verifier = PinnedIdentities::new(keys.iter().map(|(id, k)| (*id, k.verifying_key())));
    let identities = keys
        .into_iter()
        .map(|(id, k)| SiteIdentity::pinned(id, k))
        .collect();
    (identities, Arc::new(verifier))
}

pub fn seed32(a: u64, b: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&a.to_le_bytes());
    s[8..16].copy_from_slice(&b.to_le_bytes());
    s[16] = 0xc0;
    s
}

#[derive(Debug)]
pub struct Run<W: Word> {
    pub result: Result<Output<W>, Abort>,
    pub inputs: BTreeMap<ClientId, Vec<W>>,
    pub client_errors: Vec<(ClientId, ClientError)>,
    pub rejections: Vec<Rejection>,
    /// The neighbour graph the server used (derived from the advertisements).
    pub graph: Option<Box<NeighbourGraph>>,
}

/// Runs one round with `drops` and returns the server's result. Sites never named in `drops`
/// stay to the end. Inputs are arbitrary ring elements (not just quantised values), so sums
/// wrap around the modulus and exactness is tested modulo 2^BITS.
pub fn run_round<W: Word>(
    params: &Params,
    ids: &[ClientId],
    drops: &BTreeMap<ClientId, DropAt>,
    seed: u64,
    input_of: &dyn Fn(ClientId, usize) -> W,
) -> Run<W> {
    match drive(params, ids, drops, seed, input_of, false) {
        Driven::Finished(run) => run,
        Driven::ReadyToUnmask(_) => unreachable!("ran to the end"),
    }
}

// One value per test run: its size does not matter, and boxing `Run` would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Driven<W: Word> {
    Finished(Run<W>),
    /// Every unmask response is in; the next `poll` reconstructs and unmasks.
    ReadyToUnmask(Box<Server<W>>),
}

/// Delivers one site's encoded masked input into its slot, the way the transport streams it.
pub type Uploader<'a, W> = &'a dyn Fn(ClientId, &[u8], &InputSlot<W>);

/// Streams `bytes` into `slot` in chunks of `chunk` bytes, as the coordinator's connection
/// tasks do.
pub fn stream_in<W: Word>(slot: &InputSlot<W>, bytes: &[u8], chunk: usize) {
    let n = bytes.len().div_ceil(chunk);
    for (i, c) in bytes.chunks(chunk).enumerate() {
        if slot.feed(c, i + 1 == n).is_err() {
            return;
        }
    }
}

/// Like [`run_round`], but with `stop_before_unmask` returns the server just before its final
/// `poll`, for benchmarking the unmasking alone.
pub fn drive<W: Word>(
    params: &Params,
    ids: &[ClientId],
    drops: &BTreeMap<ClientId, DropAt>,
    seed: u64,
    input_of: &dyn Fn(ClientId, usize) -> W,
    stop_before_unmask: bool,
) -> Driven<W> {
    drive_with(params, ids, drops, seed, input_of, stop_before_unmask, None)
}

/// Thread-local floors every client of the next rounds on this thread applies
/// ([`Client::requiring`]): (live others, survivors).
pub fn set_requiring(live_others: u32, survivors: u32) {
    REQUIRING.with(|r| r.set((live_others, survivors)));
}

thread_local! {
    static REQUIRING: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// [`drive`] with masked inputs streamed through the server's input slots by `upload`
/// instead of handed over as whole messages.
pub fn drive_with<W: Word>(
    params: &Params,
    ids: &[ClientId],
    drops: &BTreeMap<ClientId, DropAt>,
    seed: u64,
    input_of: &dyn Fn(ClientId, usize) -> W,
    stop_before_unmask: bool,
    upload: Option<Uploader<'_, W>>,
) -> Driven<W> {
    let round = RoundId::new(seed, 0);
    let (idents, verifier) = identities(ids, seed);
    let mut clients: BTreeMap<ClientId, Client<W>> = idents
        .into_iter()
        .map(|ident| {
            let id = ident.id;
            let (live, survivors) = REQUIRING.with(|r| r.get());
            (
                id,
                Client::new(ident, verifier.clone(), round, seed32(seed, id as u64))
                    .requiring(live, survivors),
            )
        })
        .collect();
    let inputs: BTreeMap<ClientId, Vec<W>> = ids
        .iter()
        .map(|&id| {
            (
                id,
                (0..params.vector_len()).map(|i| input_of(id, i)).collect(),
            )
        })
        .collect();
    let (mut server, setup) = match Server::<W>::new(
        params.clone(),
        round,
        &pinned_roster(ids),
        seed32(seed, u64::MAX),
        verifier.clone(),
        StageTimeouts::default(),
        0,
    ) {
        Ok(x) => x,
        Err(abort) => {
            return Driven::Finished(Run {
                result: Err(abort),
                inputs,
                client_errors: vec![],
                rejections: vec![],
                graph: None,
            });
        }
    };
    let mut client_errors = Vec::new();
    let mut now = 0;
    let mut outbox: Vec<(ClientId, ServerMessage)> = ids
        .iter()
        .map(|&id| (id, ServerMessage::Setup(setup.clone())))
        .collect();
    let mut stage = 0u8;
    loop {
        // Deliver to the live clients; collect replies. Inputs are provided with the shares.
        for (to, msg) in outbox.drain(..) {
            let gone = drops
                .get(&to)
                .is_some_and(|d| (*d as u8) <= stage_index(stage, params));
            if gone {
                continue;
            }
            let Some(client) = clients.get_mut(&to) else {
                continue;
            };
            let mut reply = client.handle(&msg);
            if matches!(msg, ServerMessage::ForwardedShares(_))
                && reply.as_ref().is_ok_and(|r| r.is_none())
            {
                reply = client.set_input(QuantisedInput::from_values(inputs[&to].clone()));
            }
            match reply {
                Ok(Some(m)) => {
                    // Every message crosses the wire encoding.
                    let bytes = m.encode();
                    let decoded = ClientMessage::<W>::decode(&bytes).expect("own encoding decodes");
                    assert_eq!(decoded.encoded_len(), bytes.len());
                    let slot = server.input_slots().into_iter().find(|(id, _)| *id == to);
                    match (upload, &decoded, slot) {
                        (Some(upload), ClientMessage::MaskedInput(_), Some((_, slot))) => {
                            upload(to, &bytes, &slot)
                        }
                        _ => {
                            let _ = server.receive(to, decoded, now);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => client_errors.push((to, e)),
            }
        }
        if stop_before_unmask && server.stage() == ServerStage::Unmask && outbox.is_empty() {
            return Driven::ReadyToUnmask(Box::new(server));
        }
        match server.poll(now) {
            Ok(Poll::Pending { deadline }) => now = deadline,
            Ok(Poll::Send(msgs)) => {
                stage += 1;
                outbox = msgs
                    .into_iter()
                    .map(|(to, m)| {
                        let decoded =
                            ServerMessage::decode(&m.encode()).expect("own encoding decodes");
                        (to, decoded)
                    })
                    .collect();
            }
            Ok(Poll::Done(out)) => {
                return Driven::Finished(Run {
                    result: Ok(*out),
                    inputs,
                    client_errors,
                    rejections: server.rejections().to_vec(),
                    graph: Some(Box::new(server.graph().clone())),
                });
            }
            Err(abort) => {
                return Driven::Finished(Run {
                    result: Err(abort),
                    inputs,
                    client_errors,
                    rejections: server.rejections().to_vec(),
                    graph: Some(Box::new(server.graph().clone())),
                });
            }
        }
    }
}

/// Maps the number of server broadcasts so far to the client stage being answered.
fn stage_index(broadcasts: u8, params: &Params) -> u8 {
    match broadcasts {
        0 => DropAt::Advertise as u8,
        1 => DropAt::ShareKeys as u8,
        2 => DropAt::MaskedInput as u8,
        3 if params.consistency_check => DropAt::Consistency as u8,
        _ => DropAt::Unmask as u8,
    }
}

/// What an honest run must produce, computed without the protocol: which sets survive each
/// stage, whether every site that matters keeps t live neighbours, and the plain sum.
pub fn expected_outcome<W: Word>(
    params: &Params,
    ids: &[ClientId],
    drops: &BTreeMap<ClientId, DropAt>,
    graph: &NeighbourGraph,
    inputs: &BTreeMap<ClientId, Vec<W>>,
) -> Option<(Vec<W>, Vec<ClientId>)> {
    let alive_after = |stage: DropAt| -> BTreeSet<ClientId> {
        ids.iter()
            .copied()
            .filter(|id| drops.get(id).is_none_or(|d| *d > stage))
            .collect()
    };
    let t = params.threshold as usize;
    let ok = |live: &BTreeSet<ClientId>, need: &BTreeSet<ClientId>| {
        need.iter().all(|&v| {
            graph
                .neighbours(v)
                .iter()
                .filter(|u| live.contains(u))
                .count()
                >= t
        })
    };
    let u1 = alive_after(DropAt::Advertise);
    let u2 = alive_after(DropAt::ShareKeys);
    let u3 = alive_after(DropAt::MaskedInput);
    let u4 = if params.consistency_check {
        alive_after(DropAt::Consistency)
    } else {
        u3.clone()
    };
    let u5 = alive_after(DropAt::Unmask);
    if !(ok(&u1, &u1) && ok(&u2, &u2) && ok(&u3, &u2) && ok(&u4, &u2) && ok(&u5, &u2)) {
        return None;
    }
    // With nobody left to check, the checks above pass vacuously; the server aborts.
    if u2.is_empty() {
        return None;
    }
    // Plain sum, written independently of the crate's helpers.
    let mut sum = vec![0u64; params.vector_len()];
    let mask = if W::BITS == 64 {
        u64::MAX
    } else {
        (1u64 << W::BITS) - 1
    };
    for id in &u3 {
        for (s, x) in sum.iter_mut().zip(&inputs[id]) {
            *s = s.wrapping_add(x.to_u64()) & mask;
        }
    }
    Some((
        sum.into_iter().map(W::from_u64_wrapping).collect(),
        u3.into_iter().collect(),
    ))
}
