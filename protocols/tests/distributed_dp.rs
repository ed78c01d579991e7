//! Site-level differential privacy through the real SecAgg+ state machines: every site adds
//! its own discrete Gaussian noise before masking, and the unmasked sum carries exactly the
//! noise of the sites whose input is in it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod harness;

use std::collections::BTreeMap;

use chacha20::ChaCha20Rng;
use cohort_protocols::secagg::*;
use harness::{DropAt, run_round};
use rand_core::SeedableRng;

const SITES: u32 = 8;
const DIM: u32 = 20_000;
const SIGMA: f64 = 300.0;

fn params(min_survivors: u32) -> Params {
    Params {
        noise: Some(Noise {
            sigma: SIGMA,
            min_survivors,
        }),
        ..Params::with_defaults(SITES, DIM)
    }
}

/// Site `id`'s update: small values (norm well below the clip of 1), different per site.
fn delta(id: ClientId) -> Vec<f32> {
    (0..DIM as usize)
        .map(|j| ((id as usize * 7 + j) % 11) as f32 * 1e-4 - 5e-4)
        .collect()
}

/// Every site's quantised noisy input, as the agent would mask it.
fn inputs(p: &Params) -> BTreeMap<ClientId, Vec<u32>> {
    (0..SITES)
        .map(|id| {
            let mut rng = ChaCha20Rng::seed_from_u64(1000 + u64::from(id));
            let (x, report) = quantise::<u32, _>(p, &delta(id), 50, &mut rng).unwrap();
            assert_eq!(report.clipped, 0);
            (id, x.values().to_vec())
        })
        .collect()
}

fn variance(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (mean, xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n)
}

/// Two sites vanish before sending their input; the six survivors' sum, unmasked by the
/// server, holds Σ of their clipped updates plus noise of variance 6σ² per value — what the
/// round's privacy is priced on — and every site's own input, the only thing that leaves it,
/// already carried σ² of noise.
#[test]
fn the_unmasked_sum_carries_the_noise_of_every_survivor_and_each_input_its_own() {
    let p = params(6);
    p.validate().unwrap();
    // The noise travels in the set-up every site decodes (and signs under).
    let setup = ServerMessage::Setup(Setup::new(
        RoundId::new(4, 0),
        p.clone(),
        [3; 32],
        &[(0, "a".into()), (1, "b".into()), (2, "c".into())],
    ));
    assert_eq!(ServerMessage::decode(&setup.encode()).unwrap(), setup);
    let inputs = inputs(&p);
    let s = 65535.0 / 2.0;
    // Each input minus its noiseless quantisation (z − (x + c)·s) is noise plus rounding.
    for (id, x) in &inputs {
        let residual: Vec<f64> = x[2..]
            .iter()
            .zip(delta(*id))
            .map(|(z, d)| (*z as i32) as f64 - (f64::from(d) + 1.0) * s)
            .collect();
        let (_, var) = variance(&residual);
        // σ² plus rounding (≤ 1/4); the estimate's relative standard error is √(2/20000) = 1%.
        assert!(
            (var / (SIGMA * SIGMA) - 1.0).abs() < 0.05,
            "site {id}: variance {var}"
        );
    }
    let drops = BTreeMap::from([(1, DropAt::MaskedInput), (6, DropAt::MaskedInput)]);
    let ids: Vec<ClientId> = (0..SITES).collect();
    let run = run_round::<u32>(&p, &ids, &drops, 21, &|id, i| inputs[&id][i]);
    let out = run.result.expect("the round completes with six survivors");
    assert_eq!(out.survivors, vec![0, 2, 3, 4, 5, 7]);
    let agg = dequantise::<u32>(&p, &out.sum.to_vec(), 6).unwrap();
    assert_eq!(agg.total_weight, 6);
    let sum_noise: Vec<f64> = (0..DIM as usize)
        .map(|j| {
            let exact: f64 = out
                .survivors
                .iter()
                .map(|id| f64::from(delta(*id)[j]))
                .sum();
            (f64::from(agg.mean[j]) * 6.0 - exact) * s
        })
        .collect();
    let (mean, var) = variance(&sum_noise);
    let expected = 6.0 * SIGMA * SIGMA;
    // Mean: 5 standard errors of √(6σ²/20000); variance: 5 relative standard errors of 1%.
    assert!(
        mean.abs() < 5.0 * (expected / f64::from(DIM)).sqrt(),
        "mean {mean}"
    );
    assert!(
        (var / expected - 1.0).abs() < 0.05,
        "variance {var}, expected {expected}"
    );
    assert!((agg.noise_std - (expected.sqrt() / (s * 6.0))).abs() < 1e-12);
}

/// The noise was sized for seven survivors; with six the sum would carry less than the
/// guarantee assumes. The honest sites see the survivor set before they reveal a share and
/// refuse, so the server never gets the sum (and the dequantiser would refuse it too).
#[test]
fn a_sum_over_fewer_survivors_than_the_noise_was_sized_for_is_never_unmasked() {
    let p = params(7);
    let inputs = inputs(&p);
    let drops = BTreeMap::from([(1, DropAt::MaskedInput), (6, DropAt::MaskedInput)]);
    let ids: Vec<ClientId> = (0..SITES).collect();
    let run = run_round::<u32>(&p, &ids, &drops, 22, &|id, i| inputs[&id][i]);
    let abort = run.result.expect_err("no sum over six survivors");
    assert!(
        run.client_errors.iter().any(|(_, e)| matches!(
            e,
            ClientError::TooFewSurvivors {
                survivors: 6,
                required: 7
            }
        )),
        "{abort:?}: {:?}",
        run.client_errors
    );
    // The same sum with the floor at six is unmasked, and read as six survivors' noise.
    let p6 = params(6);
    let run = run_round::<u32>(&p6, &ids, &drops, 22, &|id, i| inputs[&id][i]);
    let out = run
        .result
        .expect("six survivors are enough for noise sized for six");
    assert_eq!(
        dequantise::<u32>(&p, &out.sum.to_vec(), out.survivors.len()).unwrap_err(),
        QuantError::TooFewForNoise {
            survivors: 6,
            min: 7
        }
    );
}

/// A site that leaves out its noise is not caught (nothing can tell noise from data), but
/// one that sends a value beyond the range plus the noise's tail is, in the sum.
#[test]
fn a_value_beyond_the_range_and_the_noise_tail_is_caught_in_the_sum() {
    let p = params(6);
    let inputs = inputs(&p);
    let ids: Vec<ClientId> = (0..SITES).collect();
    let lying = |id: ClientId, i: usize| {
        if id == 3 && i == 9 {
            inputs[&id][i].wrapping_add(1 << 28)
        } else {
            inputs[&id][i]
        }
    };
    let run = run_round::<u32>(&p, &ids, &BTreeMap::new(), 23, &lying);
    let out = run.result.expect("the protocol itself cannot see the lie");
    let err = dequantise::<u32>(&p, &out.sum.to_vec(), out.survivors.len()).unwrap_err();
    assert!(
        matches!(err, QuantError::NoisyValueOutOfRange { index: 9, .. }),
        "{err}"
    );
}

/// Kolmogorov–Smirnov distance between two samples.
fn ks(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// Plain mode with central DP and secure mode with site-level DP, set to the same total
/// noise, release the same distribution: the coordinator's single N_Z(0, 8σ²) against eight
/// sites' N_Z(0, σ²) summed under masks. Compared by variance, by kurtosis and by a
/// two-sample Kolmogorov–Smirnov test at α = 0.001 (critical distance 1.949·√(2/20000)), so a
/// correct pair fails with probability 1e-3 for a random seed, and never with these.
#[test]
fn plain_central_dp_and_secure_site_level_dp_release_the_same_distribution() {
    let p = params(8);
    let inputs = inputs(&p);
    let ids: Vec<ClientId> = (0..SITES).collect();
    let run = run_round::<u32>(&p, &ids, &BTreeMap::new(), 24, &|id, i| inputs[&id][i]);
    let out = run.result.expect("the round completes");
    let secure = dequantise::<u32>(&p, &out.sum.to_vec(), 8).unwrap();
    let deltas: Vec<Vec<f32>> = ids.iter().map(|id| delta(*id)).collect();
    let views: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
    let z = 8f64.sqrt() * SIGMA / p.l2_sensitivity();
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let (central, scaled) = central_release(&p, &views, z, &mut rng).unwrap();
    assert_eq!(scaled, 0);
    assert!((central.noise_std - secure.noise_std).abs() < 1e-12 * secure.noise_std);
    let s = 65535.0 / 2.0;
    let noise = |agg: &Aggregate| -> Vec<f64> {
        (0..DIM as usize)
            .map(|j| {
                let exact: f64 = deltas.iter().map(|d| f64::from(d[j])).sum();
                (f64::from(agg.mean[j]) * 8.0 - exact) * s
            })
            .collect()
    };
    let (mut a, mut b) = (noise(&secure), noise(&central));
    let moments = |xs: &[f64]| {
        let (_, var) = variance(xs);
        let k = xs.iter().map(|x| x.powi(4)).sum::<f64>() / xs.len() as f64 / (var * var);
        (var, k)
    };
    let ((va, ka), (vb, kb)) = (moments(&a), moments(&b));
    let expected = 8.0 * SIGMA * SIGMA;
    assert!((va / expected - 1.0).abs() < 0.05, "secure variance {va}");
    assert!((vb / expected - 1.0).abs() < 0.05, "central variance {vb}");
    // A Gaussian's kurtosis is 3; its estimate's standard error is √(24/n) ≈ 0.035.
    assert!(
        (ka - 3.0).abs() < 0.18 && (kb - 3.0).abs() < 0.18,
        "{ka} {kb}"
    );
    let d = ks(&mut a, &mut b);
    assert!(d < 1.949 * (2.0 / f64::from(DIM)).sqrt(), "KS distance {d}");
    // The test sees a real difference: the central noise at 1.1× the σ.
    let mut rng = ChaCha20Rng::seed_from_u64(100);
    let (wider, _) = central_release(&p, &views, z * 1.1, &mut rng).unwrap();
    let mut c = noise(&wider);
    assert!(ks(&mut a, &mut c) > 1.949 * (2.0 / f64::from(DIM)).sqrt());
}
