//! Criterion benchmarks of the SecAgg+ hot paths.
//!
//! `keystream/*` is the raw throughput of candidate PRGs; `mask/*` is the masking path
//! (expansion fused with accumulation) of the chosen one, in bytes of mask per second, so the
//! two can be compared directly: the goal is mask ≥ 70% of keystream for the same cipher.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::hint::black_box;

use aes::{Aes128, Aes256};
use chacha20::{ChaCha8, ChaCha12, ChaCha20};
use cohort_protocols::secagg::*;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ctr::cipher::{KeyIvInit, StreamCipher};
use harness::{Driven, DropAt, drive};

const MASK_ELEMENTS: usize = 1 << 20;

/// Generates `total` bytes of keystream in 8 KiB blocks into one L1-resident buffer: the way the
/// masking code consumes it, so the comparison with `mask/*` measures the cipher, not DRAM.
fn stream_blocks(mut cipher: impl StreamCipher, total: usize, buf: &mut [u8]) {
    let mut done = 0;
    while done < total {
        cipher.write_keystream(buf);
        done += buf.len();
    }
    black_box(&buf);
}

fn keystream_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("keystream");
    let total = MASK_ELEMENTS * 4;
    let mut buf = vec![0u8; 8 * 1024];
    g.throughput(Throughput::Bytes(total as u64));
    let iv16 = [0u8; 16];
    g.bench_function("aes256-ctr64le (chosen)", |b| {
        b.iter(|| {
            stream_blocks(
                MaskCipher::new(&[1u8; 32].into(), &iv16.into()),
                total,
                &mut buf,
            )
        })
    });
    g.bench_function("aes256-ctr128be", |b| {
        b.iter(|| {
            stream_blocks(
                ctr::Ctr128BE::<Aes256>::new(&[1u8; 32].into(), &iv16.into()),
                total,
                &mut buf,
            )
        })
    });
    g.bench_function("aes128-ctr64le (128-bit key: not used)", |b| {
        b.iter(|| {
            stream_blocks(
                ctr::Ctr64LE::<Aes128>::new(&[1u8; 16].into(), &iv16.into()),
                total,
                &mut buf,
            )
        })
    });
    for (name, rounds) in [("chacha20", 20), ("chacha12", 12), ("chacha8", 8)] {
        g.bench_function(name, |b| {
            b.iter(|| match rounds {
                20 => stream_blocks(
                    ChaCha20::new(&[1u8; 32].into(), &[0u8; 12].into()),
                    total,
                    &mut buf,
                ),
                12 => stream_blocks(
                    ChaCha12::new(&[1u8; 32].into(), &[0u8; 12].into()),
                    total,
                    &mut buf,
                ),
                _ => stream_blocks(
                    ChaCha8::new(&[1u8; 32].into(), &[0u8; 12].into()),
                    total,
                    &mut buf,
                ),
            })
        });
    }
    // Into one large buffer, as a whole-vector expansion would do (memory-bound).
    let mut big = vec![0u8; total];
    g.bench_function("aes256-ctr64le into a 4 MiB buffer", |b| {
        b.iter(|| keystream(&MaskSeed::from_bytes([1; 32]), black_box(&mut big)))
    });
    g.finish();
}

fn mask_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("mask");
    let seed = MaskSeed::from_bytes([1; 32]);
    let mut v32 = vec![0u32; MASK_ELEMENTS];
    g.throughput(Throughput::Bytes((MASK_ELEMENTS * 4) as u64));
    g.bench_function("add u32 (mod 2^32)", |b| {
        b.iter(|| apply_mask(black_box(&mut v32), &seed, Sign::Add))
    });
    let mut v64 = vec![0u64; MASK_ELEMENTS];
    g.throughput(Throughput::Bytes((MASK_ELEMENTS * 8) as u64));
    g.bench_function("add u64 (mod 2^64)", |b| {
        b.iter(|| apply_mask(black_box(&mut v64), &seed, Sign::Add))
    });
    g.finish();
}

fn shamir_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("shamir");
    let secret = [7u8; 32];
    for (k, t) in [(15usize, 9usize), (21, 12), (101, 52)] {
        let holders: Vec<u32> = (0..k as u32).collect();
        let mut rng = <chacha20::ChaCha20Rng as rand_core::SeedableRng>::seed_from_u64(1);
        g.bench_function(format!("share k={k} t={t}"), |b| {
            b.iter(|| shamir::share(black_box(&secret), &holders, t, &mut rng))
        });
        let Ok(shares) = shamir::share(&secret, &holders, t, &mut rng) else {
            panic!("sharing failed")
        };
        let exact: Vec<(u32, &shamir::Share)> =
            holders.iter().copied().zip(shares.iter()).take(t).collect();
        g.bench_function(format!("reconstruct t={t} from t"), |b| {
            b.iter(|| shamir::reconstruct(black_box(&exact), t))
        });
        let all: Vec<(u32, &shamir::Share)> = holders.iter().copied().zip(shares.iter()).collect();
        g.bench_function(
            format!("reconstruct t={t} from k={k} (verifies extras)"),
            |b| b.iter(|| shamir::reconstruct(black_box(&all), t)),
        );
    }
    g.finish();
}

fn unmask_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    g.sample_size(10);
    let n = 30u32;
    let dim = 100_000;
    let ids: Vec<ClientId> = (0..n).collect();
    let params = Params::with_defaults(n, dim);
    // 3 of 30 sites drop after sharing keys: their pairwise masks must be re-expanded.
    let drops: BTreeMap<ClientId, DropAt> = [
        (4, DropAt::MaskedInput),
        (11, DropAt::MaskedInput),
        (20, DropAt::MaskedInput),
    ]
    .into_iter()
    .collect();
    let input = |id: ClientId, i: usize| id.wrapping_mul(31).wrapping_add(i as u32) & 0xffff;
    g.bench_function(format!("server n={n} d={dim} 3 dropped"), |b| {
        b.iter_batched(
            || match drive::<u32>(&params, &ids, &drops, 5, &input, true) {
                Driven::ReadyToUnmask(server) => server,
                Driven::Finished(_) => panic!("round ended early"),
            },
            |mut server| match server.poll(0) {
                Ok(Poll::Done(out)) => out,
                other => panic!("unmask failed: {other:?}"),
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    keystream_benches,
    mask_benches,
    shamir_benches,
    unmask_benches
);
criterion_main!(benches);
