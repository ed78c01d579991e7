//! Property tests: for random sizes, parameters, inputs and dropout patterns at every stage,
//! the server's result is either exactly the plain sum of the survivors' vectors or a typed
//! abort — and it is the abort exactly when some site that matters keeps fewer than t live
//! neighbours.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod harness;

use std::collections::BTreeMap;

use cohort_protocols::secagg::*;
use harness::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    params: Params,
    ids: Vec<ClientId>,
    drops: BTreeMap<ClientId, DropAt>,
    seed: u64,
    /// Masked inputs as whole messages (None) or streamed into the server's input slots in
    /// chunks of this many bytes, splitting the prefix and elements at every possible place.
    stream_chunk: Option<usize>,
}

fn case(modulus: Modulus) -> impl Strategy<Value = Case> {
    // Mostly small rounds (cheap, many dropout patterns), sometimes up to 64 sites.
    let n = prop_oneof![5 => 3u32..=12, 2 => 13u32..=32, 1 => 33u32..=64];
    let chunk = prop_oneof![1 => Just(None), 2 => (1usize..=64).prop_map(Some)];
    (
        n,
        any::<u64>(),
        1u32..=40,
        any::<bool>(),
        0.0f64..0.3,
        chunk,
    )
        .prop_flat_map(|(n, seed, dim, consistency, drop_rate, stream_chunk)| {
            // k: odd values in [3, n), or n (classic SecAgg). Large rounds mostly use sparse
            // graphs, as in production, which keeps the case count high within CI time.
            let max_sparse = if n > 32 { 15 } else { n };
            let mut ks: Vec<u32> = (3..n.min(max_sparse + 1)).filter(|k| k % 2 == 1).collect();
            ks.push(n);
            (
                Just((n, seed, dim, consistency, drop_rate, stream_chunk)),
                proptest::sample::select(ks),
                any::<proptest::sample::Index>(),
                proptest::collection::vec((0.0f64..1.0, 0u8..5), n as usize),
                proptest::collection::btree_set(0u32..1_000_000, n as usize),
            )
        })
        .prop_map(
            move |(
                (n, seed, dim, consistency, drop_rate, stream_chunk),
                k,
                t_index,
                drop_draws,
                ids,
            )| {
                let t_min = k / 2 + 1;
                let t = t_min + t_index.index((k - 1 - t_min + 1) as usize) as u32;
                let ids: Vec<ClientId> = ids.into_iter().collect();
                let drops = ids
                    .iter()
                    .zip(drop_draws)
                    .filter(|(_, (p, _))| *p < drop_rate)
                    .map(|(&id, (_, stage))| {
                        let at = match stage {
                            0 => DropAt::Advertise,
                            1 => DropAt::ShareKeys,
                            2 => DropAt::MaskedInput,
                            3 => DropAt::Consistency,
                            _ => DropAt::Unmask,
                        };
                        (id, at)
                    })
                    .collect();
                let params = Params {
                    sites: n,
                    neighbours: k,
                    threshold: t,
                    dim,
                    clip: 1.0,
                    quant_bits: 8,
                    modulus,
                    max_weight: 100,
                    consistency_check: consistency,
                    noise: None,
                    norm_bound: None,
                };
                Case {
                    params,
                    ids,
                    drops,
                    seed,
                    stream_chunk,
                }
            },
        )
}

fn check<W: Word>(c: &Case) -> Result<(), TestCaseError> {
    let seed = c.seed;
    let input_of = move |id: ClientId, i: usize| {
        // arbitrary ring elements, so sums wrap around the modulus
        let x = (id as u64 ^ seed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
        W::from_u64_wrapping(x ^ (x >> 29))
    };
    let run = match c.stream_chunk {
        None => run_round::<W>(&c.params, &c.ids, &c.drops, c.seed, &input_of),
        Some(chunk) => {
            let upload =
                move |_: ClientId, bytes: &[u8], slot: &InputSlot<W>| stream_in(slot, bytes, chunk);
            match drive_with::<W>(
                &c.params,
                &c.ids,
                &c.drops,
                c.seed,
                &input_of,
                false,
                Some(&upload),
            ) {
                Driven::Finished(run) => run,
                Driven::ReadyToUnmask(_) => unreachable!("ran to the end"),
            }
        }
    };
    prop_assert!(
        run.client_errors.is_empty(),
        "honest clients failed: {:?}",
        run.client_errors
    );
    prop_assert!(
        run.rejections.is_empty(),
        "honest messages rejected: {:?}",
        run.rejections
    );
    let graph = match &run.graph {
        Some(g) => (**g).clone(),
        None => NeighbourGraph::new(&c.ids, c.params.neighbours, &seed32(c.seed, u64::MAX))
            .expect("valid graph"),
    };
    let expected = expected_outcome(&c.params, &c.ids, &c.drops, &graph, &run.inputs);
    match (run.result, expected) {
        (Ok(out), Some((sum, survivors))) => {
            prop_assert_eq!(out.survivors, survivors);
            prop_assert_eq!(
                out.sum.to_vec(),
                sum,
                "unmasked sum differs from the plain sum"
            );
        }
        (Err(abort), None) => {
            prop_assert!(
                matches!(
                    abort.reason,
                    AbortReason::TooFewNeighbours { .. } | AbortReason::TooFewSites { .. }
                ),
                "unexpected abort reason {:?}",
                abort
            );
        }
        (Ok(_), None) => prop_assert!(false, "round completed although quorum was lost"),
        (Err(abort), Some(_)) => {
            prop_assert!(false, "round aborted although it could recover: {}", abort)
        }
    }
    Ok(())
}

/// Cases per modulus; two tests run in parallel, so CI covers twice this many patterns.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn sum_modulo_2_32_is_exact_or_round_aborts(c in case(Modulus::Bits32)) {
        check::<u32>(&c)?;
    }

    #[test]
    fn sum_modulo_2_64_is_exact_or_round_aborts(c in case(Modulus::Bits64)) {
        check::<u64>(&c)?;
    }
}
