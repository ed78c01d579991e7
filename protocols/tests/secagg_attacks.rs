//! A lying server, tampering on the wire, replays, malformed encodings and misbehaving sites.
//! Each test drives the state machines by hand up to the point of attack.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;

use cohort_protocols::secagg::shamir::Share;
use cohort_protocols::secagg::*;
use ed25519_dalek::SigningKey;
use harness::*;
use proptest::prelude::*;

const N: u32 = 7;

/// Sites 0..N with a server, advanced stage by stage by the tests.
struct World {
    params: Params,
    round: RoundId,
    clients: BTreeMap<ClientId, Client<u32>>,
    server: Server<u32>,
    outbox: Vec<(ClientId, ServerMessage)>,
    verifier: Arc<PinnedIdentities>,
}

impl World {
    fn new(consistency_check: bool) -> Self {
        Self::with_round(consistency_check, RoundId::new(9, 0))
    }

    fn with_round(consistency_check: bool, round: RoundId) -> Self {
        let ids: Vec<ClientId> = (0..N).collect();
        let params = Params {
            consistency_check,
            ..Params::with_defaults(N, 16)
        };
        let (idents, verifier) = identities(&ids, 1);
        let clients = idents
            .into_iter()
            .map(|i| {
                let id = i.id;
                let seed = seed32(round.attempt as u64, id as u64);
                (id, Client::new(i, verifier.clone(), round, seed))
            })
            .collect();
        let (server, setup) = Server::new(
            params.clone(),
            round,
            &pinned_roster(&ids),
            seed32(round.attempt as u64, 99),
            verifier.clone(),
            StageTimeouts::default(),
            0,
        )
        .expect("valid round");
        World {
            params,
            round,
            clients,
            server,
            outbox: ids
                .iter()
                .map(|&i| (i, ServerMessage::Setup(setup.clone())))
                .collect(),
            verifier,
        }
    }

    fn input(&self, id: ClientId) -> Vec<u32> {
        (0..self.params.vector_len() as u32)
            .map(|i| id * 1000 + i)
            .collect()
    }

    /// Delivers the outbox to every client (except `skip`), feeds the replies to the server
    /// and polls it, leaving the next broadcast in the outbox. Returns the replies.
    fn step(&mut self, skip: &[ClientId]) -> Vec<(ClientId, ClientMessage<u32>)> {
        let replies = self.deliver(skip);
        self.poll_through();
        replies
    }

    /// Delivers the outbox to every client (except `skip`) and feeds the replies to the
    /// server, without polling it. Returns the replies.
    fn deliver(&mut self, skip: &[ClientId]) -> Vec<(ClientId, ClientMessage<u32>)> {
        let mut replies = Vec::new();
        for (to, msg) in std::mem::take(&mut self.outbox) {
            if skip.contains(&to) {
                continue;
            }
            let input = self.input(to);
            let client = self.clients.get_mut(&to).expect("known client");
            let mut reply = client.handle(&msg).expect("honest step succeeds");
            if reply.is_none() {
                reply = client
                    .set_input(QuantisedInput::from_values(input))
                    .expect("input accepted");
            }
            if let Some(r) = reply {
                replies.push((to, r));
            }
        }
        for (from, r) in &replies {
            self.server
                .receive(*from, r.clone(), 0)
                .expect("honest message accepted");
        }
        replies
    }

    /// The wrapping sum of the inputs of `survivors`, as the unmasked output must be.
    fn plain_sum(&self, survivors: &[ClientId]) -> Vec<u32> {
        let mut sum = vec![0u32; self.params.vector_len()];
        for &id in survivors {
            for (s, x) in sum.iter_mut().zip(self.input(id)) {
                *s = s.wrapping_add(x);
            }
        }
        sum
    }

    /// Steps every remaining stage with everyone answering, until nothing is left to send.
    fn step_to_end(&mut self) {
        for _ in 0..4 {
            if self.outbox.is_empty() {
                break;
            }
            self.step(&[]);
        }
    }

    fn poll_through(&mut self) {
        match self.server.poll(0).expect("no abort") {
            Poll::Send(m) => self.outbox = m,
            Poll::Pending { deadline } => match self.server.poll(deadline).expect("no abort") {
                Poll::Send(m) => self.outbox = m,
                other => panic!("unexpected {other:?}"),
            },
            Poll::Done(_) => self.outbox.clear(),
        }
    }

    fn message_for(&self, id: ClientId) -> ServerMessage {
        self.outbox
            .iter()
            .find(|(to, _)| *to == id)
            .map(|(_, m)| m.clone())
            .expect("a message for this site")
    }
}

#[test]
fn substituted_public_key_is_detected() {
    let mut w = World::new(false);
    w.step(&[]); // setup -> advertise; outbox: neighbour keys
    let ServerMessage::NeighbourKeys(mut keys) = w.message_for(0) else {
        panic!()
    };
    let victim = keys.keys[0].sender;
    // The server swaps in a mask key it knows the secret of; the signature no longer matches.
    keys.keys[0].mask_pk =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32])).to_bytes();
    let client = w.clients.get_mut(&0).expect("client 0");
    assert_eq!(
        client.handle(&ServerMessage::NeighbourKeys(keys.clone())),
        Err(ClientError::BadSignature { peer: victim })
    );
    assert_eq!(client.stage(), ClientStage::Failed);

    // Re-signing with the server's own key fails the identity check instead.
    let mut w = World::new(false);
    w.step(&[]);
    let ServerMessage::NeighbourKeys(mut keys) = w.message_for(0) else {
        panic!()
    };
    let server_key = SigningKey::from_bytes(&[42u8; 32]);
    keys.keys[0].credential = server_key.verifying_key().to_bytes().to_vec();
    let err = w
        .clients
        .get_mut(&0)
        .expect("client 0")
        .handle(&ServerMessage::NeighbourKeys(keys));
    assert!(
        matches!(err, Err(ClientError::BadIdentity { peer, .. }) if peer == victim),
        "{err:?}"
    );
}

#[test]
fn server_rejects_forged_advertisement_and_round_goes_on() {
    let mut w = World::new(false);
    let ServerMessage::Setup(setup) = w.message_for(3) else {
        panic!()
    };
    // Site 3 signs its keys with a key that is not its identity.
    let forged_ident = SiteIdentity {
        id: 3,
        name: pinned_name(3),
        signing_key: SigningKey::from_bytes(&[3u8; 32]),
        credential: identities(&[3], 1).0.remove(0).credential,
    };
    let mut forger: Client<u32> = Client::new(forged_ident, w.verifier.clone(), w.round, [3u8; 32]);
    let Some(forged) = forger
        .handle(&ServerMessage::Setup(setup))
        .expect("setup ok")
    else {
        panic!()
    };
    let rejection = w
        .server
        .receive(3, forged, 0)
        .expect_err("forged keys must be rejected");
    assert_eq!(rejection.reason, RejectReason::BadSignature);
    w.outbox.retain(|(to, _)| *to != 3);
    // The other six finish the round; site 3 is simply absent.
    w.step_to_end();
    assert_eq!(w.server.stage(), ServerStage::Done);
}

#[test]
fn client_refuses_to_reveal_both_shares_of_a_peer() {
    let mut w = World::new(false);
    w.step(&[]); // advertise
    w.step(&[]); // share keys
    w.step(&[]); // masked input; outbox: unmask requests
    let ServerMessage::UnmaskRequest(honest) = w.message_for(0) else {
        panic!()
    };
    // Ask for the mask key of a neighbour that also appears as a survivor.
    let peer = *honest.survivors.iter().find(|&&s| s != 0).expect("a peer");
    let mut both = honest.clone();
    both.dropped = vec![peer];
    let client = w.clients.get_mut(&0).expect("client 0");
    assert_eq!(
        client.handle(&ServerMessage::UnmaskRequest(both)),
        Err(ClientError::BothSharesRequested { peer })
    );
    // After a refusal the client stays failed: asking again honestly reveals nothing.
    assert_eq!(
        client.handle(&ServerMessage::UnmaskRequest(honest)),
        Err(ClientError::Failed)
    );

    // Asking twice: the second request (with the peer now "dropped") is refused.
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]);
    w.step(&[]);
    let ServerMessage::UnmaskRequest(honest) = w.message_for(0) else {
        panic!()
    };
    let client = w.clients.get_mut(&0).expect("client 0");
    let first = client
        .handle(&ServerMessage::UnmaskRequest(honest.clone()))
        .expect("honest request");
    assert!(matches!(first, Some(ClientMessage::UnmaskShares(_))));
    let mut second = honest;
    second.survivors.retain(|&s| s != peer);
    second.dropped = vec![peer];
    let err = client
        .handle(&ServerMessage::UnmaskRequest(second))
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ClientError::UnexpectedMessage {
                stage: ClientStage::Done,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn consistency_check_catches_a_changed_survivor_set() {
    let mut w = World::new(true);
    w.step(&[]);
    w.step(&[]);
    w.step(&[]); // masked input; outbox: consistency requests
    assert!(matches!(
        w.message_for(0),
        ServerMessage::ConsistencyRequest(_)
    ));
    w.step(&[]); // signatures; outbox: unmask requests with signatures
    let ServerMessage::UnmaskRequest(honest) = w.message_for(0) else {
        panic!()
    };
    assert!(honest.signatures.len() + 1 >= w.params.threshold as usize);
    let mut changed = honest.clone();
    let peer = *changed.survivors.iter().find(|&&s| s != 0).expect("a peer");
    changed.survivors.retain(|&s| s != peer);
    changed.dropped.push(peer);
    changed.dropped.sort_unstable();
    assert_eq!(
        w.clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::UnmaskRequest(changed)),
        Err(ClientError::SurvivorSetChanged)
    );
    // A forged neighbour signature is caught too.
    let ServerMessage::UnmaskRequest(mut forged) = w.message_for(2) else {
        panic!()
    };
    forged.signatures[0].1[5] ^= 1;
    let signer = forged.signatures[0].0;
    assert_eq!(
        w.clients
            .get_mut(&2)
            .expect("client 2")
            .handle(&ServerMessage::UnmaskRequest(forged)),
        Err(ClientError::BadSignature { peer: signer })
    );
}

#[test]
fn tampered_or_misrouted_share_is_rejected() {
    // The coordinator flips a bit of a forwarded share: it no longer matches its sender's
    // signed list, so the recipient blames the forwarder, not the sender.
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]); // outbox: forwarded shares
    let ServerMessage::ForwardedShares(shares) = w.message_for(0) else {
        panic!()
    };
    let mut tampered = shares.clone();
    tampered.shares[0].ciphertext[10] ^= 0x80;
    let from = tampered.shares[0].peer;
    let err = w
        .clients
        .get_mut(&0)
        .expect("client 0")
        .handle(&ServerMessage::ForwardedShares(tampered))
        .unwrap_err();
    assert_eq!(err, ClientError::TamperedShare { peer: from });
    assert_eq!(err.accused(), None, "the coordinator may have done it");
    // The same ciphertext attributed to another sender: refused too.
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]);
    let ServerMessage::ForwardedShares(mut misrouted) = w.message_for(0) else {
        panic!()
    };
    let (a, b) = (misrouted.shares[0].peer, misrouted.shares[1].peer);
    misrouted.shares[0].peer = b;
    misrouted.shares[1].peer = a;
    assert_eq!(
        w.clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::ForwardedShares(misrouted)),
        Err(ClientError::TamperedShare { peer: b })
    );
}

#[test]
fn a_site_that_signs_an_undecryptable_share_is_named_by_its_recipient() {
    // Site 3 sends site 0 garbage and signs its list over it: site 0 proves it was site 3.
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]);
    let ServerMessage::ForwardedShares(mut shares) = w.message_for(0) else {
        panic!()
    };
    let (keys, _) = identities(&(0..N).collect::<Vec<_>>(), 1);
    let share = shares
        .shares
        .iter_mut()
        .find(|s| s.peer == 3)
        .expect("a share from site 3");
    share.ciphertext = vec![0x42; share.ciphertext.len()];
    let garbage = share_digest(&share.ciphertext);
    let list = shares
        .lists
        .iter_mut()
        .find(|l| l.sender == 3)
        .expect("site 3's signed list");
    for (to, digest) in &mut list.digests {
        if *to == 0 {
            *digest = garbage;
        }
    }
    list.signature = sign_share_list(&keys[3].signing_key, w.round, 3, &list.digests);
    let err = w
        .clients
        .get_mut(&0)
        .expect("client 0")
        .handle(&ServerMessage::ForwardedShares(shares))
        .unwrap_err();
    assert_eq!(err, ClientError::ShareDecryption { peer: 3 });
    assert_eq!(err.accused(), Some(3));
    assert!(err.to_string().contains("site 3 is at fault"), "{err}");
    // The coordinator can tell this accusation has evidence: site 3 did send site 0 a share.
    // An accusation of a site that sent none (or of a site not in the round) has none.
    assert!(w.server.forwarded_share(3, 0));
    assert!(!w.server.forwarded_share(0, 0));
    assert!(!w.server.forwarded_share(99, 0));
}

#[test]
fn the_coordinator_refuses_a_share_list_its_sender_did_not_sign() {
    // Without this check a site could send garbage unsigned and have its recipients blame
    // the coordinator.
    let mut w = World::new(false);
    w.step(&[]); // advertise; outbox: neighbour keys
    let ServerMessage::NeighbourKeys(keys) = w.message_for(2) else {
        panic!()
    };
    let replies = w.deliver(&[2]);
    assert!(replies.iter().all(|(from, _)| *from != 2));
    let Some(ClientMessage::ShareKeys(mut share_keys)) = w
        .clients
        .get_mut(&2)
        .expect("client 2")
        .handle(&ServerMessage::NeighbourKeys(keys))
        .expect("share keys")
    else {
        panic!()
    };
    share_keys.shares[0].ciphertext[0] ^= 1;
    assert_eq!(
        w.server
            .receive(2, ClientMessage::ShareKeys(share_keys), 0)
            .unwrap_err()
            .reason,
        RejectReason::BadSignature
    );
}

#[test]
fn messages_from_another_round_are_rejected() {
    // A client ignores a server message from another attempt and stays usable.
    let mut w = World::new(false);
    let ServerMessage::Setup(mut setup) = w.message_for(0) else {
        panic!()
    };
    setup.round = RoundId::new(9, 1);
    let client = w.clients.get_mut(&0).expect("client 0");
    assert!(matches!(
        client.handle(&ServerMessage::Setup(setup)),
        Err(ClientError::WrongRound { .. })
    ));
    assert_eq!(client.stage(), ClientStage::AwaitingSetup);

    // Keys advertised in attempt 0, replayed by the server into attempt 1, are refused.
    let mut old = World::with_round(false, RoundId::new(9, 0));
    old.step(&[]);
    let ServerMessage::NeighbourKeys(old_keys) = old.message_for(0) else {
        panic!()
    };
    let mut new = World::with_round(false, RoundId::new(9, 1));
    new.step(&[]);
    let ServerMessage::NeighbourKeys(mut keys) = new.message_for(0) else {
        panic!()
    };
    let replayed = old_keys
        .keys
        .iter()
        .find(|k| k.sender == keys.keys[0].sender)
        .expect("same neighbour")
        .clone();
    let peer = replayed.sender;
    keys.keys[0] = replayed;
    assert_eq!(
        new.clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::NeighbourKeys(keys)),
        Err(ClientError::ReplayedKey { peer })
    );

    // The server drops a site that sends a message for another round.
    let mut w = World::new(false);
    let replies = {
        let mut r = Vec::new();
        for (to, msg) in std::mem::take(&mut w.outbox) {
            let m = w
                .clients
                .get_mut(&to)
                .expect("client")
                .handle(&msg)
                .expect("ok")
                .expect("reply");
            r.push((to, m));
        }
        r
    };
    let (from, ClientMessage::AdvertiseKeys(mut adv)) = replies[2].clone() else {
        panic!()
    };
    adv.round = RoundId::new(8, 0);
    let rej = w
        .server
        .receive(from, ClientMessage::AdvertiseKeys(adv), 0)
        .expect_err("replay");
    assert_eq!(
        rej.reason,
        RejectReason::WrongRound {
            got: RoundId::new(8, 0)
        }
    );
    // ...and once excluded, its genuine message is refused too.
    let rej = w
        .server
        .receive(from, replies[2].1.clone(), 0)
        .expect_err("excluded");
    assert_eq!(rej.reason, RejectReason::Excluded);
}

#[test]
fn wrong_length_upload_drops_the_site_and_the_round_completes() {
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]); // outbox: forwarded shares
    let mut replies = Vec::new();
    for (to, msg) in std::mem::take(&mut w.outbox) {
        let input = w.input(to);
        let c = w.clients.get_mut(&to).expect("client");
        assert!(c.handle(&msg).expect("ok").is_none());
        replies.push((
            to,
            c.set_input(QuantisedInput::from_values(input))
                .expect("ok")
                .expect("masked"),
        ));
    }
    let bad = 4;
    let mut expected = vec![0u32; w.params.vector_len()];
    for (from, msg) in replies {
        let msg = if from == bad {
            let ClientMessage::MaskedInput(mut m) = msg else {
                panic!()
            };
            m.values.pop();
            ClientMessage::MaskedInput(m)
        } else {
            add_assign(&mut expected, &w.input(from));
            msg
        };
        let r = w.server.receive(from, msg, 0);
        if from == bad {
            assert_eq!(
                r.expect_err("short vector").reason,
                RejectReason::WrongLength {
                    got: 17,
                    expected: 18
                }
            );
        } else {
            r.expect("accepted");
        }
    }
    w.poll_through();
    let replies: Vec<_> = std::mem::take(&mut w.outbox)
        .into_iter()
        .map(|(to, m)| {
            (
                to,
                w.clients
                    .get_mut(&to)
                    .expect("c")
                    .handle(&m)
                    .expect("ok")
                    .expect("shares"),
            )
        })
        .collect();
    assert!(
        replies.iter().all(|(to, _)| *to != bad),
        "the dropped site is not asked to unmask"
    );
    for (from, m) in replies {
        w.server.receive(from, m, 0).expect("accepted");
    }
    let Poll::Done(out) = w.server.poll(0).expect("no abort") else {
        panic!("not done")
    };
    assert_eq!(out.dropped, vec![bad]);
    assert_eq!(out.sum.to_vec(), expected);
}

#[test]
fn stage_timeout_turns_silent_sites_into_dropouts() {
    let mut w = World::new(false);
    w.step(&[]);
    w.step(&[]);
    // Site 5 never uploads; the server waits until the deadline, then goes on without it.
    let deadline = w.server.deadline();
    for (to, msg) in std::mem::take(&mut w.outbox) {
        if to == 5 {
            continue;
        }
        let input = w.input(to);
        let c = w.clients.get_mut(&to).expect("client");
        c.handle(&msg).expect("ok");
        let m = c
            .set_input(QuantisedInput::from_values(input))
            .expect("ok")
            .expect("masked");
        w.server.receive(to, m, deadline - 1).expect("in time");
    }
    assert!(matches!(
        w.server.poll(deadline - 1),
        Ok(Poll::Pending { .. })
    ));
    assert!(matches!(w.server.poll(deadline), Ok(Poll::Send(_))));
    assert_eq!(w.server.stage(), ServerStage::Unmask);
}

#[test]
fn a_disconnected_site_ends_the_wait_at_once_in_every_stage() {
    // For each stage: one site goes silent and its transport reports it gone. The stage must
    // close at time 0 (not at its deadline), the round must finish, and the result must be
    // the exact sum of the survivors' inputs.
    for gone_before in 0..5usize {
        let mut w = World::new(true);
        let victim: ClientId = 3;
        let mut broadcasts = 0;
        while !w.outbox.is_empty() {
            let skip: Vec<ClientId> = if broadcasts >= gone_before {
                vec![victim]
            } else {
                vec![]
            };
            w.deliver(&skip);
            if broadcasts == gone_before {
                assert!(
                    matches!(w.server.poll(0), Ok(Poll::Pending { .. })),
                    "stage {gone_before}: still waits for the silent site"
                );
                assert_eq!(w.server.awaiting(), vec![victim]);
                w.server.disconnected(victim);
                assert!(w.server.awaiting().is_empty());
            }
            // Never past time 0: no deadline is involved.
            match w.server.poll(0).expect("no abort") {
                Poll::Send(m) => w.outbox = m,
                Poll::Done(out) => {
                    assert!(!out.survivors.contains(&victim) || gone_before >= 3);
                    assert_eq!(
                        out.sum.to_vec(),
                        w.plain_sum(&out.survivors),
                        "stage {gone_before}"
                    );
                    w.outbox.clear();
                }
                Poll::Pending { .. } => panic!("stage {gone_before}: waits for a gone site"),
            }
            broadcasts += 1;
        }
        assert_eq!(w.server.stage(), ServerStage::Done, "stage {gone_before}");
    }
}

#[test]
fn unsafe_parameters_from_the_server_are_refused() {
    let mut w = World::new(false);
    let ServerMessage::Setup(mut setup) = w.message_for(0) else {
        panic!()
    };
    setup.params.threshold = 2; // below a majority of the neighbourhood
    let err = w
        .clients
        .get_mut(&0)
        .expect("c")
        .handle(&ServerMessage::Setup(setup))
        .expect_err("unsafe");
    assert!(
        matches!(
            err,
            ClientError::InvalidParams(ParamError::ThresholdTooLow { .. })
        ),
        "{err:?}"
    );
}

// ---- encoding -------------------------------------------------------------------------------

fn sample_messages() -> (Vec<ServerMessage>, Vec<ClientMessage<u32>>) {
    let mut w = World::new(true);
    let mut server_msgs = Vec::new();
    let mut client_msgs = Vec::new();
    for _ in 0..5 {
        if w.outbox.is_empty() {
            break;
        }
        server_msgs.extend(w.outbox.iter().take(2).map(|(_, m)| m.clone()));
        client_msgs.extend(w.step(&[]).into_iter().take(2).map(|(_, m)| m));
    }
    (server_msgs, client_msgs)
}

#[test]
fn every_truncation_and_extension_is_a_decode_error() {
    let (server_msgs, client_msgs) = sample_messages();
    assert!(server_msgs.len() >= 5 && client_msgs.len() >= 5);
    for m in &server_msgs {
        let bytes = m.encode();
        assert_eq!(ServerMessage::decode(&bytes).as_ref(), Ok(m));
        for cut in 0..bytes.len() {
            assert!(
                ServerMessage::decode(&bytes[..cut]).is_err(),
                "{} cut at {cut}",
                m.name()
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            ServerMessage::decode(&longer),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
    }
    for m in &client_msgs {
        let bytes = m.encode();
        assert_eq!(bytes.len(), m.encoded_len());
        assert_eq!(ClientMessage::<u32>::decode(&bytes).as_ref(), Ok(m));
        for cut in 0..bytes.len() {
            assert!(
                ClientMessage::<u32>::decode(&bytes[..cut]).is_err(),
                "{} cut at {cut}",
                m.name()
            );
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            ClientMessage::<u32>::decode(&longer),
            Err(DecodeError::TrailingBytes { extra: 3 })
        );
    }
}

#[test]
fn header_and_field_errors_are_specific() {
    let (_, client_msgs) = sample_messages();
    let masked = client_msgs
        .iter()
        .find(|m| matches!(m, ClientMessage::MaskedInput(_)))
        .expect("a masked input")
        .encode();
    let mut bad = masked.clone();
    bad[0] = b'X';
    assert_eq!(
        ClientMessage::<u32>::decode(&bad),
        Err(DecodeError::BadMagic)
    );
    let mut bad = masked.clone();
    // version 1 (before rosters and self-mask commitments) is no longer spoken
    bad[3] = 1;
    assert_eq!(
        ClientMessage::<u32>::decode(&bad),
        Err(DecodeError::UnsupportedVersion { got: 1 })
    );
    let mut bad = masked.clone();
    bad[4] = 0x7f;
    assert!(matches!(
        ClientMessage::<u32>::decode(&bad),
        Err(DecodeError::UnknownTag { tag: 0x7f, .. })
    ));
    // a 32-bit round's vector is not accepted as a 64-bit one
    assert!(matches!(
        ClientMessage::<u64>::decode(&masked),
        Err(DecodeError::Invalid {
            what: "element width",
            ..
        })
    ));
    // a count far beyond the message is refused before allocating
    let mut bad = masked.clone();
    let count_at = 5 + 44 + 4 + 1;
    bad[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        ClientMessage::<u32>::decode(&bad),
        Err(DecodeError::Truncated { .. })
    ));
    // a server message is not a client message
    let (server_msgs, _) = sample_messages();
    assert!(matches!(
        ClientMessage::<u32>::decode(&server_msgs[0].encode()),
        Err(DecodeError::UnknownTag { .. })
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), tag in 0u8..0x20) {
        let mut framed = b"CSA\x01".to_vec();
        framed.push(tag);
        framed.extend_from_slice(&bytes);
        let _ = ServerMessage::decode(&bytes);
        let _ = ServerMessage::decode(&framed);
        let _ = ClientMessage::<u32>::decode(&framed);
        let _ = ClientMessage::<u64>::decode(&framed);
    }
}

#[test]
fn a_duplicate_message_excludes_its_sender_but_the_stage_still_waits_for_the_others() {
    let mut w = World::new(false);
    let mut replies = Vec::new();
    for (to, msg) in std::mem::take(&mut w.outbox) {
        let m = w
            .clients
            .get_mut(&to)
            .expect("client")
            .handle(&msg)
            .expect("ok")
            .expect("reply");
        replies.push((to, m));
    }
    // Sites 0..=5 answer, site 0 twice; site 6 has not answered yet.
    let last = replies.pop().expect("site 6");
    w.server
        .receive(0, replies[0].1.clone(), 0)
        .expect("first is fine");
    let rej = w
        .server
        .receive(0, replies[0].1.clone(), 0)
        .expect_err("duplicate");
    assert_eq!(rej.reason, RejectReason::Duplicate("AdvertiseKeys"));
    for (from, m) in replies.into_iter().skip(1) {
        w.server.receive(from, m, 0).expect("fine");
    }
    // Six advertisements are stored, but one is from the excluded site: five of the six live
    // sites have answered, so the stage must keep waiting for site 6.
    assert!(matches!(w.server.poll(1), Ok(Poll::Pending { .. })));
    w.server.receive(last.0, last.1, 1).expect("fine");
    let Ok(Poll::Send(msgs)) = w.server.poll(1) else {
        panic!("stage should close")
    };
    assert!(
        msgs.iter().all(|(to, _)| *to != 0),
        "the excluded site gets nothing more"
    );
    assert_eq!(msgs.len(), N as usize - 1);
}

/// Runs the first two stages and returns every site's encoded masked input, undelivered.
fn encoded_inputs(w: &mut World) -> Vec<(ClientId, Vec<u8>)> {
    w.step(&[]);
    w.step(&[]); // outbox: forwarded shares
    std::mem::take(&mut w.outbox)
        .into_iter()
        .map(|(to, msg)| {
            let input = w.input(to);
            let c = w.clients.get_mut(&to).expect("client");
            assert!(c.handle(&msg).expect("ok").is_none());
            let m = c
                .set_input(QuantisedInput::from_values(input))
                .expect("ok")
                .expect("masked");
            (to, m.encode())
        })
        .collect()
}

fn slot(w: &World, id: ClientId) -> Arc<InputSlot<u32>> {
    w.server
        .input_slots()
        .into_iter()
        .find(|(s, _)| *s == id)
        .map(|(_, s)| s)
        .expect("a slot for every site that shared keys")
}

/// Closes the masked-input stage and runs the unmasking with every site that is asked.
fn finish(w: &mut World) -> Result<Output<u32>, Abort> {
    let now = 600_001; // past the masked-input deadline
    match w.server.poll(now)? {
        Poll::Send(m) => w.outbox = m,
        other => panic!("unexpected {other:?}"),
    }
    for (to, m) in std::mem::take(&mut w.outbox) {
        let reply = w.clients.get_mut(&to).expect("c").handle(&m).expect("ok");
        if let Some(r) = reply {
            w.server.receive(to, r, now).expect("accepted");
        }
    }
    match w.server.poll(now)? {
        Poll::Done(out) => Ok(*out),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn streamed_uploads_are_checked_before_anything_reaches_the_sum() {
    // Site 1 misbehaves in a different way each time; the others stream honestly.
    for kind in ["short prefix", "wrong sender", "trailing bytes"] {
        let mut w = World::new(false);
        let inputs = encoded_inputs(&mut w);
        let mut expected = vec![0u32; w.params.vector_len()];
        for (from, bytes) in &inputs {
            let s = slot(&w, *from);
            if *from != 1 {
                add_assign(&mut expected, &w.input(*from));
                stream_in(&s, bytes, 7);
                assert_eq!(
                    s.feed(&bytes[..8], true),
                    Err(RejectReason::Duplicate("MaskedInput"))
                );
                continue;
            }
            let mut b = bytes.clone();
            match kind {
                "short prefix" => {
                    let at = MASKED_INPUT_PREFIX - 4;
                    b[at..at + 4].copy_from_slice(&17u32.to_le_bytes());
                    let r = s.feed(&b[..MASKED_INPUT_PREFIX + 8], false);
                    assert_eq!(
                        r,
                        Err(RejectReason::WrongLength {
                            got: 17,
                            expected: 18
                        })
                    );
                    assert_eq!(
                        s.feed(&b[MASKED_INPUT_PREFIX + 8..], true),
                        Err(RejectReason::Excluded)
                    );
                }
                "wrong sender" => {
                    // Site 1 uploads site 3's bytes; its slot is the transport's identity.
                    let other = &inputs.iter().find(|(i, _)| *i == 3).expect("3").1;
                    let r = s.feed(other, true);
                    assert_eq!(r, Err(RejectReason::WrongSender { claimed: 3 }));
                }
                _ => {
                    b.extend_from_slice(&[0; 4]);
                    let r = s.feed(&b, true);
                    assert_eq!(
                        r,
                        Err(RejectReason::WrongLength {
                            got: 19,
                            expected: 18
                        })
                    );
                }
            }
        }
        let late = slot(&w, 0);
        // Every site's upload began, refused or not: each has contributed to the attempt
        // (the driver's ledger of who may join a retry), and that survives the stage's close.
        let slots: Vec<_> = inputs.iter().map(|(from, _)| slot(&w, *from)).collect();
        assert!(slots.iter().all(|s| s.started()), "{kind}");
        let out = finish(&mut w).expect("the others complete the round");
        assert!(slots.iter().all(|s| s.started()), "{kind}");
        assert_eq!(out.sum.to_vec(), expected, "{kind}");
        assert_eq!(out.dropped, vec![1], "{kind}");
        let refused: Vec<_> = w.server.rejections().iter().map(|r| r.client).collect();
        assert_eq!(refused, vec![1], "{kind}");
        // After the stage closed nothing more reaches the sum.
        assert_eq!(late.feed(&[0; 8], false), Err(RejectReason::Late));
    }
}

#[test]
fn an_upload_that_stops_part_way_aborts_the_attempt_naming_the_site() {
    for last in [false, true] {
        let mut w = World::new(false);
        let inputs = encoded_inputs(&mut w);
        for (from, bytes) in &inputs {
            let s = slot(&w, *from);
            if *from == 6 {
                // Half the values, then the connection ends (or the chunk claims to be last).
                let r = s.feed(&bytes[..bytes.len() / 2], last);
                assert_eq!(r.is_err(), last);
            } else {
                stream_in(&s, bytes, 64);
            }
        }
        let abort = finish(&mut w).expect_err("a partial input cannot be unmasked");
        assert_eq!(abort.reason, AbortReason::PartialInput { client: 6 });
        assert_eq!(abort.stage, ServerStage::MaskedInput);
    }
}

#[test]
fn the_stage_closes_early_once_every_upload_is_complete_or_refused() {
    let mut w = World::new(false);
    let inputs = encoded_inputs(&mut w);
    for (from, bytes) in &inputs {
        let s = slot(&w, *from);
        assert!(matches!(w.server.poll(0), Ok(Poll::Pending { .. })));
        if *from == 0 {
            assert!(s.feed(&bytes[..3], true).is_err());
        } else {
            stream_in(&s, bytes, 1000);
        }
    }
    assert!(matches!(w.server.poll(0), Ok(Poll::Send(_))));
}

/// `share` with one limb changed: still a field element, no longer on the polynomial.
fn corrupted(share: &Share) -> Share {
    let mut bytes = share.to_bytes();
    bytes[0] ^= 0x5a;
    Share::from_bytes(&bytes).expect("still in the field")
}

#[test]
fn a_wrong_revealed_share_is_identified_and_the_sum_is_still_exact() {
    let mut w = World::new(false);
    w.step(&[]); // advertise
    w.step(&[]); // share keys
    w.step(&[6]); // masked input without site 6: it drops, its mask key is reconstructed
    let mut replies = Vec::new();
    for (to, msg) in std::mem::take(&mut w.outbox) {
        let client = w.clients.get_mut(&to).expect("client");
        let Some(ClientMessage::UnmaskShares(mut m)) = client.handle(&msg).expect("honest") else {
            panic!("unmask shares expected")
        };
        // Site 2 lies about its share of site 4's self-mask seed; site 1 about site 6's mask
        // key. Both are valid field elements, so only the commitments can tell.
        for s in &mut m.shares {
            if (to == 2 && s.owner == 4) || (to == 1 && s.owner == 6) {
                s.share = corrupted(&s.share);
            }
        }
        replies.push((to, ClientMessage::UnmaskShares(m)));
    }
    for (from, r) in replies {
        w.server.receive(from, r, 0).expect("well-formed");
    }
    let Poll::Done(out) = w.server.poll(0).expect("no abort") else {
        panic!("the round completes")
    };
    assert_eq!(out.survivors, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(out.sum.to_vec(), w.plain_sum(&out.survivors));
    let culprits: Vec<(ClientId, RejectReason)> = out
        .rejections
        .iter()
        .map(|r| (r.client, r.reason.clone()))
        .collect();
    assert_eq!(
        culprits,
        // in the order the owners are unmasked
        vec![
            (
                2,
                RejectReason::WrongRevealedShare {
                    owner: 4,
                    kind: ShareKind::SelfMaskSeed
                }
            ),
            (
                1,
                RejectReason::WrongRevealedShare {
                    owner: 6,
                    kind: ShareKind::MaskKey
                }
            ),
        ]
    );
}

#[test]
fn an_invalid_advertised_point_is_refused_naming_the_site_and_the_round_goes_on() {
    let mut w = World::new(false);
    let setup = w.message_for(3);
    let client = w.clients.get_mut(&3).expect("client 3");
    let Some(ClientMessage::AdvertiseKeys(mut adv)) = client.handle(&setup).expect("setup") else {
        panic!()
    };
    // u = 0 is a point of order 2: every "shared secret" with it is predictable. Site 3 signs
    // it properly, so only the point check can refuse it.
    adv.mask_pk = [0u8; 32];
    let key = identities(&[3], 1).0.remove(0).signing_key;
    adv.signature =
        ed25519_dalek::Signer::sign(&key, &adv.signed_payload(&pinned_name(3))).to_bytes();
    let rejection = w
        .server
        .receive(3, ClientMessage::AdvertiseKeys(adv), 0)
        .expect_err("refused");
    assert_eq!(rejection.reason, RejectReason::InvalidPublicKey);
    w.outbox.retain(|(to, _)| *to != 3);
    w.step_to_end();
    assert_eq!(w.server.stage(), ServerStage::Done);
}

#[test]
fn a_site_input_outside_the_quantisation_range_is_caught_in_the_sum_before_it_is_used() {
    // Masking hides each input, so range checks can only run on the sum: every valid input
    // has weight <= max_weight, clipped <= dim and values <= 2^q - 1, and so must the sum of
    // the survivors' inputs. Site 5 lies in one element at a time.
    let params = Params::with_defaults(N, 16);
    let ids: Vec<ClientId> = (0..N).collect();
    let top = (1u32 << params.quant_bits) - 1;
    let valid = |_id: ClientId, i: usize| match i {
        0 => params.max_weight as u32,
        1 => params.dim,
        _ => top,
    };
    let honest = run_round::<u32>(&params, &ids, &BTreeMap::new(), 3, &valid);
    let out = honest.result.expect("round completes");
    let agg = dequantise::<u32>(&params, &out.sum.to_vec(), out.survivors.len())
        .expect("the extreme valid inputs pass");
    assert_eq!(agg.total_weight, N as u64 * params.max_weight);
    for (index, lie) in [
        (0, params.max_weight as u32 + 1),
        (1, params.dim + 1),
        (9, top + 1),
    ] {
        let lying = |id: ClientId, i: usize| {
            if id == 5 && i == index {
                lie
            } else {
                valid(id, i)
            }
        };
        let run = run_round::<u32>(&params, &ids, &BTreeMap::new(), 3, &lying);
        let out = run.result.expect("the protocol itself cannot see the lie");
        let err = dequantise::<u32>(&params, &out.sum.to_vec(), out.survivors.len()).unwrap_err();
        match index {
            0 => assert!(matches!(err, QuantError::WeightOutOfRange { .. }), "{err}"),
            1 => assert!(matches!(err, QuantError::ClippedOutOfRange { .. }), "{err}"),
            _ => assert!(
                matches!(err, QuantError::ValueOutOfRange { index: 9, .. }),
                "{err}"
            ),
        }
    }
}

/// The seed corpus of the `secagg_decode` fuzz target (`fuzz/seeds/secagg_decode`): messages
/// of every stage as this version encodes them, so fuzzing starts from valid messages rather
/// than rediscovering the format. After a wire change, `COHORT_WRITE_FUZZ_SEEDS=1` rewrites
/// them; otherwise they must match what the code encodes today.
#[test]
fn the_fuzz_seed_corpus_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/secagg_decode");
    let (server_msgs, client_msgs) = sample_messages();
    let seeds: Vec<(String, Vec<u8>)> = server_msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("server-{i:02}"), m.encode()))
        .chain(
            client_msgs
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("client-{i:02}"), m.encode())),
        )
        .collect();
    if std::env::var_os("COHORT_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        let on_disk = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (COHORT_WRITE_FUZZ_SEEDS=1 writes the seeds)"));
        assert_eq!(
            &on_disk, bytes,
            "{name} is stale: the encoding changed (COHORT_WRITE_FUZZ_SEEDS=1 rewrites the seeds)"
        );
    }
}

#[test]
fn a_round_everyone_left_aborts_instead_of_finishing_empty() {
    // Found with the real agents: when every site declined, each neighbourhood check passed
    // vacuously (nobody left to check) and the round "finished" with an empty sum.
    let mut w = World::new(true);
    w.step(&[]); // keys advertised; share keys open
    for id in 0..N {
        w.server.disconnected(id);
    }
    let abort = w.server.poll(0).expect_err("nobody left");
    assert_eq!(
        abort.reason,
        AbortReason::TooFewSites {
            live: 0,
            threshold: w.params.threshold
        }
    );
}

/// The round context (the manifest digest each site trusts) is in every signature: a server
/// that shows one site another context, to run it in a round of its own making, cannot pass
/// that site's advertisement to the others, with or without relabelling it.
#[test]
fn a_site_shown_another_context_cannot_be_passed_off_to_its_peers() {
    let a = RoundId::new(9, 0).with_context([0xaa; 32]);
    let b = RoundId::new(9, 0).with_context([0xbb; 32]);
    let mut honest = World::with_round(false, a);
    honest.step(&[]);
    let mut shown_b = World::with_round(false, b);
    shown_b.step(&[]);
    let ServerMessage::NeighbourKeys(keys) = honest.message_for(0) else {
        panic!()
    };
    let ServerMessage::NeighbourKeys(other) = shown_b.message_for(0) else {
        panic!()
    };
    let peer = keys.keys[0].sender;
    let from_b = other
        .keys
        .iter()
        .find(|k| k.sender == peer)
        .expect("same neighbour")
        .clone();

    // Setup for context B is refused by a site that trusts context A.
    let ServerMessage::Setup(setup_b) = World::with_round(false, b).message_for(0) else {
        panic!()
    };
    let mut fresh = World::with_round(false, a);
    assert!(matches!(
        fresh
            .clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::Setup(setup_b)),
        Err(ClientError::WrongRound { .. })
    ));

    // Forwarded as signed: refused as another round's key.
    let mut forwarded = keys.clone();
    forwarded.keys[0] = from_b.clone();
    assert_eq!(
        honest
            .clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::NeighbourKeys(forwarded)),
        Err(ClientError::ReplayedKey { peer })
    );
    // Relabelled with context A: the signature covers the context, so it does not verify.
    // (A refused NeighbourKeys ends a client's round, so each lie gets a fresh, identical world.)
    let mut honest = World::with_round(false, a);
    honest.step(&[]);
    let mut relabelled = keys.clone();
    relabelled.keys[0] = AdvertiseKeys { round: a, ..from_b };
    assert_eq!(
        honest
            .clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::NeighbourKeys(relabelled)),
        Err(ClientError::BadSignature { peer })
    );
    // The untouched message goes through: the refusals are the context's doing.
    let mut honest = World::with_round(false, a);
    honest.step(&[]);
    assert!(
        honest
            .clients
            .get_mut(&0)
            .expect("client 0")
            .handle(&ServerMessage::NeighbourKeys(keys))
            .is_ok()
    );
}

/// The coordinator learns whose masked input reached an attempt from the slots, not from the
/// sites: a site that sent nothing may join a retry, one whose bytes arrived may not (its
/// contribution ledger refuses, and asking would only cost the attempt).
#[test]
fn a_slot_says_whether_its_sites_input_began_to_arrive() {
    let mut w = World::new(false);
    let inputs = encoded_inputs(&mut w);
    for (from, bytes) in &inputs {
        let s = slot(&w, *from);
        assert!(!s.started());
        if *from != 2 {
            stream_in(&s, bytes, 64);
        }
    }
    let slots: Vec<_> = inputs
        .iter()
        .map(|(from, _)| (*from, slot(&w, *from)))
        .collect();
    let out = finish(&mut w).expect("the others complete the round");
    assert_eq!(out.dropped, vec![2]);
    for (from, s) in slots {
        assert_eq!(s.started(), from != 2, "site {from}");
    }
}

/// A site's own floors on who is really there (`Client::requiring`): the neighbours whose
/// keys it verified and who then shared and survived, and the survivors of the round. A
/// coordinator that lists sites and withholds them looks like dropouts; with these floors
/// the sites refuse before their input is summed with fewer others than they asked for.
#[test]
fn sites_refuse_a_round_with_fewer_live_others_or_survivors_than_they_require() {
    let params = Params::with_defaults(N, 16);
    let ids: Vec<ClientId> = (0..N).collect();
    let ones = |_: ClientId, _: usize| 1u32;
    // N = 7 sites, two of which never advertise: four live others each.
    let drops: BTreeMap<ClientId, DropAt> = [(5, DropAt::Advertise), (6, DropAt::Advertise)].into();
    set_requiring(4, 5);
    let fine = run_round::<u32>(&params, &ids, &drops, 11, &ones);
    assert!(fine.result.is_ok(), "{:?}", fine.client_errors);
    set_requiring(5, 0);
    let few = run_round::<u32>(&params, &ids, &drops, 12, &ones);
    assert!(few.result.is_err());
    assert!(
        few.client_errors.iter().all(|(_, e)| matches!(
            e,
            ClientError::TooFewLive {
                others: 4,
                required: 5,
                ..
            }
        )) && few.client_errors.len() == 5,
        "{:?}",
        few.client_errors
    );
    // Live at the key exchange, gone before the sum: caught when the survivors are named.
    let late: BTreeMap<ClientId, DropAt> =
        [(5, DropAt::MaskedInput), (6, DropAt::MaskedInput)].into();
    set_requiring(0, 6);
    let fewer = run_round::<u32>(&params, &ids, &late, 13, &ones);
    set_requiring(0, 0);
    assert!(fewer.result.is_err());
    assert!(
        !fewer.client_errors.is_empty()
            && fewer.client_errors.iter().all(|(_, e)| matches!(
                e,
                ClientError::TooFewSurvivors {
                    survivors: 5,
                    required: 6
                }
            )),
        "{:?}",
        fewer.client_errors
    );
}
