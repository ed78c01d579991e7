//! The ring elements that masked vectors are made of.
//!
//! SecAgg+ arithmetic happens modulo 2^32 or 2^64, which is exactly the wrapping arithmetic of
//! `u32` and `u64`. The protocol code is generic over [`Word`] so the 32-bit modulus costs half
//! the keystream, memory and bandwidth of the 64-bit one instead of being emulated inside `u64`.

use std::fmt::Debug;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// An element of Z/2^BITS: `u32` for modulus 2^32, `u64` for modulus 2^64.
pub trait Word: Copy + Default + Eq + Ord + Debug + Send + Sync + 'static + sealed::Sealed {
    /// log2 of the modulus.
    const BITS: u32;
    /// Bytes per element on the wire and in the keystream.
    const BYTES: usize;
    /// The additive identity.
    const ZERO: Self;

    fn wrapping_add(self, other: Self) -> Self;
    fn wrapping_sub(self, other: Self) -> Self;
    /// Reduces `v` modulo 2^BITS.
    fn from_u64_wrapping(v: u64) -> Self;
    fn to_u64(self) -> u64;
    /// The element read as a two's-complement signed number of BITS bits.
    fn to_signed(self) -> i64;
    /// Reads one little-endian element; `bytes.len()` must be `Self::BYTES`.
    fn read_le(bytes: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! impl_word {
    ($t:ty, $s:ty) => {
        impl Word for $t {
            const BITS: u32 = <$t>::BITS;
            const BYTES: usize = std::mem::size_of::<$t>();
            const ZERO: Self = 0;

            #[inline(always)]
            fn wrapping_add(self, other: Self) -> Self {
                <$t>::wrapping_add(self, other)
            }
            #[inline(always)]
            fn wrapping_sub(self, other: Self) -> Self {
                <$t>::wrapping_sub(self, other)
            }
            #[inline(always)]
            fn from_u64_wrapping(v: u64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_u64(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn to_signed(self) -> i64 {
                self as $s as i64
            }
            #[inline(always)]
            fn read_le(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
            #[inline(always)]
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}

impl_word!(u32, i32);
impl_word!(u64, i64);

/// `acc[i] += x[i]` modulo 2^BITS. The plain loop vectorises; it is the server's hot path when
/// masked inputs arrive.
pub fn add_assign<W: Word>(acc: &mut [W], x: &[W]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(*b);
    }
}
