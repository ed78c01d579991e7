//! The mask PRG: AES-256 in counter mode.
//!
//! Masks must be indistinguishable from uniform to anyone without the seed, so the PRG is a
//! stream cipher keyed with the full 256-bit seed (never a truncated seed, never a
//! non-cryptographic generator). AES-256-CTR was chosen over ChaCha because this machine has
//! hardware AES: `cargo bench -p cohort-protocols --bench secagg -- keystream` measures both
//! (see docs/benchmarks.md).
//!
//! Expansion is fused with accumulation: the keystream is written into a small stack buffer
//! that stays in L1 and immediately added into (or subtracted from) the target vector, so a
//! mask is never materialised as a whole vector.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::word::Word;

/// The stream cipher that expands mask seeds. The 64-bit little-endian counter allows 2^68
/// bytes per seed, far beyond any model.
pub type MaskCipher = ctr::Ctr64LE<Aes256>;

/// Bytes of keystream produced per step: large enough to amortise the call, small enough to
/// stay in L1 next to the slice being updated.
const BLOCK_BYTES: usize = 8 * 1024;

/// A 256-bit PRG seed. Zeroised on drop because a seed is as good as the mask it expands to.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct MaskSeed(pub(crate) [u8; 32]);

impl std::fmt::Debug for MaskSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskSeed(..)")
    }
}

impl MaskSeed {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MaskSeed(bytes)
    }

    fn cipher(&self) -> MaskCipher {
        MaskCipher::new(&self.0.into(), &[0u8; 16].into())
    }
}

/// Whether a mask is added to or subtracted from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    Add,
    Sub,
}

impl Sign {
    pub fn flip(self) -> Sign {
        match self {
            Sign::Add => Sign::Sub,
            Sign::Sub => Sign::Add,
        }
    }
}

/// `target += sign * PRG(seed)` element-wise modulo 2^BITS, each element drawn from
/// `W::BYTES` bytes of keystream (uniform modulo 2^BITS).
pub fn apply_mask<W: Word>(target: &mut [W], seed: &MaskSeed, sign: Sign) {
    MaskStream::new(seed).apply(target, sign);
}

/// A mask applied piece by piece: consecutive calls continue the keystream, so applying it to
/// the consecutive ranges of a split vector equals applying it to the whole vector.
pub struct MaskStream {
    cipher: MaskCipher,
}

impl std::fmt::Debug for MaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskStream(..)")
    }
}

impl MaskStream {
    pub fn new(seed: &MaskSeed) -> Self {
        MaskStream {
            cipher: seed.cipher(),
        }
    }

    /// Adds or subtracts the next `target.len()` mask elements.
    pub fn apply<W: Word>(&mut self, target: &mut [W], sign: Sign) {
        apply_with(&mut self.cipher, target, sign)
    }
}

fn apply_with<W: Word>(cipher: &mut MaskCipher, target: &mut [W], sign: Sign) {
    let mut buf = [0u8; BLOCK_BYTES];
    for chunk in target.chunks_mut(BLOCK_BYTES / W::BYTES) {
        let bytes = &mut buf[..chunk.len() * W::BYTES];
        cipher.write_keystream(bytes);
        let words = bytes.chunks_exact(W::BYTES).map(W::read_le);
        match sign {
            Sign::Add => {
                for (t, m) in chunk.iter_mut().zip(words) {
                    *t = t.wrapping_add(m);
                }
            }
            Sign::Sub => {
                for (t, m) in chunk.iter_mut().zip(words) {
                    *t = t.wrapping_sub(m);
                }
            }
        }
    }
    buf.zeroize();
}

/// Fills `out` with raw keystream of the mask PRG. Only for benchmarks, to show masking
/// throughput next to the cipher's own.
pub fn keystream(seed: &MaskSeed, out: &mut [u8]) {
    seed.cipher().write_keystream(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_cancels_and_mask_is_not_zero() {
        let seed = MaskSeed([7u8; 32]);
        let original: Vec<u32> = (0..10_000).collect();
        let mut v = original.clone();
        apply_mask(&mut v, &seed, Sign::Add);
        assert_ne!(v, original);
        // a mask must look uniform: no element should equal its input in more than a handful
        // of positions out of 10k (expected 10_000 / 2^32)
        let same = v.iter().zip(&original).filter(|(a, b)| a == b).count();
        assert!(same < 3, "{same} elements unchanged");
        apply_mask(&mut v, &seed, Sign::Sub);
        assert_eq!(v, original);
    }

    #[test]
    fn mask_equals_little_endian_keystream_words() {
        let seed = MaskSeed([3u8; 32]);
        let mut stream = vec![0u8; 8 * 3000];
        keystream(&seed, &mut stream);
        let mut v = vec![0u64; 3000];
        apply_mask(&mut v, &seed, Sign::Add);
        for (i, x) in v.iter().enumerate() {
            let want = u64::from_le_bytes(stream[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            assert_eq!(*x, want, "element {i}");
        }
        let mut w = vec![0u32; 3000];
        apply_mask(&mut w, &seed, Sign::Sub);
        for (i, x) in w.iter().enumerate() {
            let m = u32::from_le_bytes(stream[i * 4..i * 4 + 4].try_into().unwrap_or_default());
            assert_eq!(*x, 0u32.wrapping_sub(m), "element {i}");
        }
    }

    #[test]
    fn a_mask_streamed_over_ranges_equals_the_whole_mask() {
        let seed = MaskSeed([9u8; 32]);
        let mut whole = vec![0u32; 5000];
        apply_mask(&mut whole, &seed, Sign::Add);
        let mut pieces = vec![0u32; 5000];
        let mut stream = MaskStream::new(&seed);
        // Odd lengths: ranges end in the middle of AES blocks.
        let (a, rest) = pieces.split_at_mut(7);
        let (b, c) = rest.split_at_mut(2049);
        for part in [a, b, c] {
            stream.apply(part, Sign::Add);
        }
        assert_eq!(pieces, whole);
    }

    #[test]
    fn different_seeds_give_different_masks() {
        let mut a = vec![0u32; 64];
        let mut b = vec![0u32; 64];
        apply_mask(&mut a, &MaskSeed([1u8; 32]), Sign::Add);
        let mut seed = [1u8; 32];
        seed[31] = 2; // differs only in the last byte: the whole seed must matter
        apply_mask(&mut b, &MaskSeed(seed), Sign::Add);
        assert_ne!(a, b);
    }
}
