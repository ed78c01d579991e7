//! Shamir secret sharing of 32-byte secrets over the prime field GF(2^61 - 1).
//!
//! Why this field: a Mersenne prime makes reduction two shifts and an add, and its size allows
//! any number of share holders (x-coordinates are site ids + 1), unlike GF(2^8) which caps a
//! neighbourhood at 255. A 32-byte secret is split into five limbs of at most 56 bits, each
//! shared with its own random polynomial of degree t - 1; a share is the five evaluations.
//!
//! Reconstruction uses t shares and, when more are given, checks every extra share against the
//! interpolated polynomial, so a corrupted share is detected instead of silently producing a
//! wrong secret.

use rand_core::Rng;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The field modulus 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;
/// Limbs per 32-byte secret: 4 × 7 bytes + 1 × 4 bytes.
pub const LIMBS: usize = 5;
/// Encoded size of one share.
pub const SHARE_BYTES: usize = LIMBS * 8;
const LIMB_BYTES: usize = 7;

/// One holder's share of one secret: the value of each limb polynomial at the holder's x.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Share(pub(crate) [u64; LIMBS]);

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Share(..)")
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShamirError {
    #[error("{have} shares given, {need} needed")]
    NotEnoughShares { have: usize, need: usize },
    #[error("two shares have the same holder {0}")]
    DuplicateHolder(u32),
    #[error("a share value is not a field element (>= 2^61 - 1)")]
    NotInField,
    #[error("the shares are inconsistent: at least one was corrupted")]
    Inconsistent,
    #[error("threshold {threshold} is invalid for {holders} holders")]
    BadThreshold { threshold: usize, holders: usize },
}

impl Share {
    pub fn to_bytes(&self) -> [u8; SHARE_BYTES] {
        let mut out = [0u8; SHARE_BYTES];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(self.0.iter()) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        out
    }

    /// Parses a share, rejecting values outside the field.
    pub fn from_bytes(bytes: &[u8; SHARE_BYTES]) -> Result<Self, ShamirError> {
        let mut limbs = [0u64; LIMBS];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(b);
            if *limb >= P {
                return Err(ShamirError::NotInField);
            }
        }
        Ok(Share(limbs))
    }
}

#[inline]
fn reduce(x: u128) -> u64 {
    // x < 2^122: fold the high bits twice (2^61 ≡ 1 mod P).
    let folded = (x as u64 & P) as u128 + (x >> 61);
    let mut r = (folded as u64 & P) + (folded >> 61) as u64;
    if r >= P {
        r -= P;
    }
    r
}

#[inline]
fn mul(a: u64, b: u64) -> u64 {
    reduce(a as u128 * b as u128)
}

#[inline]
fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

#[inline]
fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// The x-coordinate of a holder. Ids are u32, so id + 1 is never 0 and never reaches P.
fn x_of(holder: u32) -> u64 {
    holder as u64 + 1
}

fn uniform_field<R: Rng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

fn secret_limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    for (limb, chunk) in limbs.iter_mut().zip(secret.chunks(LIMB_BYTES)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *limb = u64::from_le_bytes(b);
    }
    limbs
}

/// Splits `secret` into one share per holder; any `threshold` of them reconstruct it, fewer
/// reveal nothing. `holders` must be distinct.
pub fn share<R: Rng + ?Sized>(
    secret: &[u8; 32],
    holders: &[u32],
    threshold: usize,
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > holders.len() {
        return Err(ShamirError::BadThreshold {
            threshold,
            holders: holders.len(),
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(holders.len());
    for &h in holders {
        if !seen.insert(h) {
            return Err(ShamirError::DuplicateHolder(h));
        }
    }
    let mut limbs = secret_limbs(secret);
    // coefficients[l][j]: coefficient of x^j of limb l's polynomial; [l][0] is the secret limb.
    let mut coefficients = vec![[0u64; LIMBS]; threshold];
    coefficients[0] = limbs;
    for row in coefficients.iter_mut().skip(1) {
        for c in row.iter_mut() {
            *c = uniform_field(rng);
        }
    }
    let shares = holders
        .iter()
        .map(|&h| {
            let x = x_of(h);
            let mut y = [0u64; LIMBS];
            for (l, yl) in y.iter_mut().enumerate() {
                // Horner from the highest coefficient down.
                *yl = coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, row| add(mul(acc, x), row[l]));
            }
            Share(y)
        })
        .collect();
    coefficients.zeroize();
    limbs.zeroize();
    Ok(shares)
}

/// Replaces every element of `v` (all non-zero) by its inverse with one field inversion
/// (Montgomery's trick).
fn batch_invert(v: &mut [u64]) {
    let mut prefix = Vec::with_capacity(v.len());
    let mut acc = 1u64;
    for &x in v.iter() {
        prefix.push(acc);
        acc = mul(acc, x);
    }
    let mut inv_acc = inv(acc);
    for (x, p) in v.iter_mut().zip(prefix).rev() {
        let inv_x = mul(inv_acc, p);
        inv_acc = mul(inv_acc, *x);
        *x = inv_x;
    }
}

/// Lagrange basis of the points `xs`, evaluated anywhere with O(t) work per point.
///
/// λ_i(a) = Π_{j≠i} (a − x_j) / (x_i − x_j). The denominators do not depend on `a`, so they are
/// inverted once; the numerators are N(a) / (a − x_i) with N(a) = Π_j (a − x_j). This keeps the
/// verification of every extra share cheap even for classic SecAgg's large neighbourhoods.
struct LagrangeBasis<'a> {
    xs: &'a [u64],
    inv_denominators: Vec<u64>,
}

impl<'a> LagrangeBasis<'a> {
    /// `xs` must be distinct.
    fn new(xs: &'a [u64]) -> Self {
        let mut inv_denominators: Vec<u64> = xs
            .iter()
            .enumerate()
            .map(|(i, &xi)| {
                xs.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .fold(1, |acc, (_, &xj)| mul(acc, sub(xi, xj)))
            })
            .collect();
        batch_invert(&mut inv_denominators);
        LagrangeBasis {
            xs,
            inv_denominators,
        }
    }

    /// The basis at `at`, which must not be one of the points.
    fn at(&self, at: u64) -> Vec<u64> {
        let mut diffs: Vec<u64> = self.xs.iter().map(|&x| sub(at, x)).collect();
        let numerator = diffs.iter().fold(1, |acc, &d| mul(acc, d));
        batch_invert(&mut diffs);
        diffs
            .iter()
            .zip(&self.inv_denominators)
            .map(|(&inv_diff, &inv_den)| mul(mul(numerator, inv_diff), inv_den))
            .collect()
    }
}

fn interpolate(coeffs: &[u64], shares: &[&Share]) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (c, s) in coeffs.iter().zip(shares) {
        for (o, y) in out.iter_mut().zip(s.0.iter()) {
            *o = add(*o, mul(*c, *y));
        }
    }
    out
}

/// Reconstructs a secret from at least `threshold` shares `(holder, share)`. Extra shares are
/// verified against the polynomial the first `threshold` define.
pub fn reconstruct(shares: &[(u32, &Share)], threshold: usize) -> Result<[u8; 32], ShamirError> {
    check_shares(shares, threshold)?;
    let (base, extra) = shares.split_at(threshold);
    let xs: Vec<u64> = base.iter().map(|(h, _)| x_of(*h)).collect();
    let ys: Vec<&Share> = base.iter().map(|(_, s)| *s).collect();
    let basis = LagrangeBasis::new(&xs);
    let mut limbs = interpolate(&basis.at(0), &ys);
    for (h, s) in extra {
        if interpolate(&basis.at(x_of(*h)), &ys) != s.0 {
            limbs.zeroize();
            return Err(ShamirError::Inconsistent);
        }
    }
    let secret = limbs_to_secret(&limbs);
    limbs.zeroize();
    secret.ok_or(ShamirError::Inconsistent)
}

/// A secret reconstructed by [`reconstruct_verified`] and the holders whose shares were wrong.
#[derive(Debug)]
pub struct Verified {
    pub secret: [u8; 32],
    /// Holders whose share is not on the polynomial that yields the accepted secret.
    pub wrong: Vec<u32>,
}

impl Drop for Verified {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// Subsets tried by [`reconstruct_verified`] beyond the first: enough that a handful of wrong
/// shares among a neighbourhood is found with near certainty, few enough (each try is O(t²)
/// field operations and one `accept`) that a flood of wrong shares costs milliseconds.
const MAX_SUBSETS: usize = 512;

/// Reconstructs the secret that `accept` recognises (a commitment to it: a hash, a public key)
/// even when some shares are wrong, and names the holders of the wrong ones, so that one lying
/// site is identified instead of aborting every attempt. Tries the first `threshold` shares,
/// then every rotation of the list, then pseudo-random subsets; a subset whose secret `accept`s
/// defines the true polynomial (the commitment binds it), and every share off it is wrong.
pub fn reconstruct_verified(
    shares: &[(u32, &Share)],
    threshold: usize,
    accept: impl Fn(&[u8; 32]) -> bool,
) -> Result<Verified, ShamirError> {
    check_shares(shares, threshold)?;
    let m = shares.len();
    let mut tried = std::collections::HashSet::new();
    let rotations = (0..m).map(|start| (0..threshold).map(|i| (start + i) % m).collect());
    let mut rng = <chacha20::ChaCha20Rng as rand_core::SeedableRng>::from_seed([7; 32]);
    let random = std::iter::repeat_with(move || {
        let mut idx: Vec<usize> = (0..m).collect();
        for i in 0..threshold {
            let j = i + (rng.next_u64() as usize) % (m - i);
            idx.swap(i, j);
        }
        idx.truncate(threshold);
        idx
    })
    .take(MAX_SUBSETS);
    for mut subset in rotations.chain(random) {
        subset.sort_unstable();
        if !tried.insert(subset.clone()) {
            continue;
        }
        let base: Vec<(u32, &Share)> = subset.iter().map(|&i| shares[i]).collect();
        let xs: Vec<u64> = base.iter().map(|(h, _)| x_of(*h)).collect();
        let ys: Vec<&Share> = base.iter().map(|(_, s)| *s).collect();
        let basis = LagrangeBasis::new(&xs);
        let mut limbs = interpolate(&basis.at(0), &ys);
        let secret = limbs_to_secret(&limbs);
        limbs.zeroize();
        let Some(secret) = secret else { continue };
        let mut candidate = Verified {
            secret,
            wrong: Vec::new(),
        };
        if !accept(&candidate.secret) {
            continue;
        }
        for (i, (h, s)) in shares.iter().enumerate() {
            if subset.binary_search(&i).is_err() && interpolate(&basis.at(x_of(*h)), &ys) != s.0 {
                candidate.wrong.push(*h);
            }
        }
        return Ok(candidate);
    }
    Err(ShamirError::Inconsistent)
}

/// The secret whose limbs these are, or None if a limb does not fit its byte width (which no
/// real secret's can).
fn limbs_to_secret(limbs: &[u64; LIMBS]) -> Option<[u8; 32]> {
    let mut secret = [0u8; 32];
    for (l, chunk) in secret.chunks_mut(LIMB_BYTES).enumerate() {
        let bytes = limbs[l].to_le_bytes();
        if bytes[chunk.len()..].iter().any(|&b| b != 0) {
            secret.zeroize();
            return None;
        }
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Some(secret)
}

fn check_shares(shares: &[(u32, &Share)], threshold: usize) -> Result<(), ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::NotEnoughShares {
            have: shares.len(),
            need: threshold,
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(shares.len());
    for (h, s) in shares {
        if !seen.insert(*h) {
            return Err(ShamirError::DuplicateHolder(*h));
        }
        if s.0.iter().any(|&v| v >= P) {
            return Err(ShamirError::NotInField);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use proptest::prelude::*;
    use rand_core::SeedableRng;

    #[test]
    fn batch_inversion_matches_single_inversions() {
        let mut v: Vec<u64> = vec![1, 2, 3, P - 1, 1 << 60, 123_456_789];
        let expected: Vec<u64> = v.iter().map(|&x| inv(x)).collect();
        batch_invert(&mut v);
        assert_eq!(v, expected);
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1); // (-1)^2
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        for a in [1u64, 2, 12345, P - 2, 1 << 60] {
            assert_eq!(mul(a, inv(a)), 1, "a = {a}");
        }
    }

    proptest! {
        #[test]
        fn any_threshold_subset_reconstructs(
            secret in proptest::array::uniform32(any::<u8>()),
            holders in proptest::collection::btree_set(any::<u32>(), 2..40),
            seed in any::<u64>(),
            t_frac in 0.0f64..1.0,
            pick_seed in any::<u64>(),
        ) {
            let holders: Vec<u32> = holders.into_iter().collect();
            let t = 1 + ((holders.len() - 1) as f64 * t_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let shares = share(&secret, &holders, t, &mut rng).unwrap();
            // a pseudo-random subset of size >= t, in a shuffled order
            let mut idx: Vec<usize> = (0..holders.len()).collect();
            let mut s = pick_seed;
            for i in (1..idx.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (s >> 33) as usize % (i + 1));
            }
            let take = t + (pick_seed as usize % (holders.len() - t + 1));
            let subset: Vec<(u32, &Share)> = idx[..take].iter().map(|&i| (holders[i], &shares[i])).collect();
            prop_assert_eq!(reconstruct(&subset, t).unwrap(), secret);
            // one share fewer than the threshold is refused
            let short: Vec<(u32, &Share)> = subset[..t - 1].to_vec();
            prop_assert_eq!(reconstruct(&short, t), Err(ShamirError::NotEnoughShares { have: t - 1, need: t }));
        }

        #[test]
        fn corrupted_extra_share_is_detected(
            secret in proptest::array::uniform32(any::<u8>()),
            seed in any::<u64>(),
            limb in 0usize..LIMBS,
            delta in 1u64..P,
        ) {
            let holders: Vec<u32> = (10..20).collect();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut shares = share(&secret, &holders, 6, &mut rng).unwrap();
            shares[8].0[limb] = add(shares[8].0[limb], delta);
            let all: Vec<(u32, &Share)> = holders.iter().copied().zip(shares.iter()).collect();
            prop_assert_eq!(reconstruct(&all, 6), Err(ShamirError::Inconsistent));
        }
    }

    #[test]
    fn fewer_than_threshold_shares_do_not_determine_the_secret() {
        // With t - 1 shares fixed, every candidate secret is consistent with some polynomial:
        // check that two different secrets can produce identical t - 1 shares for a t = 2 scheme
        // by solving for the coefficient. Here: sharing 0 and 1 with t = 2 at holder 5, shares
        // are a1*6 and 1 + a1'*6; choosing a1' = a1 - inv(6) makes them equal.
        let x = x_of(5);
        let a1 = 123_456u64;
        let a1_prime = sub(a1, inv(x));
        assert_eq!(mul(a1, x), add(1, mul(a1_prime, x)));
    }

    #[test]
    fn rejects_bad_inputs() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(matches!(
            share(&[0; 32], &[1, 2, 1], 2, &mut rng),
            Err(ShamirError::DuplicateHolder(1))
        ));
        assert!(matches!(
            share(&[0; 32], &[1, 2], 3, &mut rng),
            Err(ShamirError::BadThreshold { .. })
        ));
        let shares = share(&[9; 32], &[1, 2, 3], 2, &mut rng).unwrap();
        assert_eq!(
            reconstruct(&[(1, &shares[0]), (1, &shares[0])], 2),
            Err(ShamirError::DuplicateHolder(1))
        );
        let mut bytes = [0u8; SHARE_BYTES];
        bytes[..8].copy_from_slice(&P.to_le_bytes());
        assert_eq!(Share::from_bytes(&bytes), Err(ShamirError::NotInField));
        assert_eq!(
            Share::from_bytes(&shares[1].to_bytes()),
            Ok(shares[1].clone())
        );
    }
}
