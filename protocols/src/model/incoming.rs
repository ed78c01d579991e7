//! A model arriving in chunks, verified and decoded as it comes.
//!
//! An agent used to buffer the model's bytes, hash them when the last chunk came, then decode
//! them into parameters: two model-sized buffers at once, and one SHA3-512 of the whole model
//! (about 0.23 s for 40 MB here) in a single step at the end. [`Incoming`] hashes each chunk
//! and decodes it straight into the parameter vector, so a site holds one copy of the model
//! and the hash is done when the last byte is in. Sans-IO: the session feeds it chunks.

use sha3::{Digest, Sha3_512};
use thiserror::Error;

/// Why an arriving model was refused. Each names what the coordinator got wrong, for the
/// site's Decline.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IncomingError {
    #[error("the model is larger than the {announced} bytes announced")]
    Oversize { announced: u64 },
    #[error("the model ended after {got} of the {announced} bytes announced")]
    Short { got: u64, announced: u64 },
    #[error("the announced model size, {0} bytes, is not a whole number of f32 values")]
    NotWhole(u64),
    #[error("cannot set aside memory for the announced model of {0} bytes")]
    TooLarge(u64),
    #[error("the model's SHA3-512 does not match")]
    HashMismatch,
    #[error("the model's signature does not verify against the coordinator's certificate")]
    BadSignature,
}

/// A model announced as `announced` bytes (little-endian f32), received chunk by chunk.
#[derive(Debug)]
pub struct Incoming {
    announced: u64,
    received: u64,
    hasher: Sha3_512,
    params: Vec<f32>,
    /// The first bytes of a value split across two chunks (senders cut at multiples of 4, but
    /// the wire does not promise it).
    carry: [u8; 4],
    carry_len: usize,
}

impl Incoming {
    /// Sets aside the whole parameter vector up front, so a model too large for this site is
    /// refused before any of it arrives rather than by the allocator half-way through.
    pub fn new(announced: u64) -> Result<Self, IncomingError> {
        if !announced.is_multiple_of(4) {
            return Err(IncomingError::NotWhole(announced));
        }
        let values =
            usize::try_from(announced / 4).map_err(|_| IncomingError::TooLarge(announced))?;
        let mut params = Vec::new();
        params
            .try_reserve_exact(values)
            .map_err(|_| IncomingError::TooLarge(announced))?;
        Ok(Incoming {
            announced,
            received: 0,
            hasher: Sha3_512::new(),
            params,
            carry: [0; 4],
            carry_len: 0,
        })
    }

    /// Takes the next chunk. More bytes than announced are refused before they are kept.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), IncomingError> {
        if self.received + chunk.len() as u64 > self.announced {
            return Err(IncomingError::Oversize {
                announced: self.announced,
            });
        }
        self.received += chunk.len() as u64;
        self.hasher.update(chunk);
        if self.carry_len > 0 {
            let take = (4 - self.carry_len).min(chunk.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&chunk[..take]);
            self.carry_len += take;
            chunk = &chunk[take..];
            if self.carry_len < 4 {
                return Ok(());
            }
            self.params.push(f32::from_le_bytes(self.carry));
            self.carry_len = 0;
        }
        let whole = chunk.chunks_exact(4);
        let rest = whole.remainder();
        self.params
            .extend(whole.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
        Ok(())
    }

    /// The parameters, once every announced byte has arrived, the SHA3-512 matches
    /// `sha3_512` and `signature` is the coordinator's (`key`) signature of it.
    pub fn finish(
        self,
        sha3_512: &[u8],
        signature: &[u8],
        key: Option<&ed25519_dalek::VerifyingKey>,
    ) -> Result<Vec<f32>, IncomingError> {
        if self.received != self.announced {
            return Err(IncomingError::Short {
                got: self.received,
                announced: self.announced,
            });
        }
        let digest: [u8; 64] = self.hasher.finalize().into();
        if digest.as_slice() != sha3_512 {
            return Err(IncomingError::HashMismatch);
        }
        if !key.is_some_and(|k| super::verify_model(k, &digest, signature)) {
            return Err(IncomingError::BadSignature);
        }
        Ok(self.params)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::{sha3_512, sign_model, to_bytes};

    fn signed(params: &[f32]) -> (Vec<u8>, [u8; 64], [u8; 64], ed25519_dalek::SigningKey) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let bytes = to_bytes(params);
        let hash = sha3_512(&bytes);
        let sig = sign_model(&key, &hash);
        (bytes, hash, sig, key)
    }

    #[test]
    fn chunks_cut_anywhere_give_the_model_bit_exactly() {
        let params: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin()).collect();
        let (bytes, hash, sig, key) = signed(&params);
        for size in [1, 3, 4, 5, 7, 64, 4003, bytes.len()] {
            let mut m = Incoming::new(bytes.len() as u64).unwrap();
            for c in bytes.chunks(size) {
                m.push(c).unwrap();
            }
            let got = m.finish(&hash, &sig, Some(&key.verifying_key())).unwrap();
            let same = got
                .iter()
                .zip(&params)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && got.len() == params.len(), "chunk size {size}");
        }
    }

    #[test]
    fn a_model_that_differs_from_its_announcement_is_refused() {
        let params = vec![1.5f32; 100];
        let (bytes, hash, sig, key) = signed(&params);
        let vk = key.verifying_key();

        let mut m = Incoming::new(396).unwrap();
        assert_eq!(
            m.push(&bytes),
            Err(IncomingError::Oversize { announced: 396 })
        );

        let mut m = Incoming::new(400).unwrap();
        m.push(&bytes[..396]).unwrap();
        assert_eq!(
            m.finish(&hash, &sig, Some(&vk)).unwrap_err(),
            IncomingError::Short {
                got: 396,
                announced: 400
            }
        );

        let mut flipped = bytes.clone();
        flipped[17] ^= 1;
        let mut m = Incoming::new(400).unwrap();
        m.push(&flipped).unwrap();
        assert_eq!(
            m.finish(&hash, &sig, Some(&vk)).unwrap_err(),
            IncomingError::HashMismatch
        );

        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        for key in [Some(other.verifying_key()), None] {
            let mut m = Incoming::new(400).unwrap();
            m.push(&bytes).unwrap();
            assert_eq!(
                m.finish(&hash, &sig, key.as_ref()).unwrap_err(),
                IncomingError::BadSignature
            );
        }

        assert_eq!(
            Incoming::new(401).unwrap_err(),
            IncomingError::NotWhole(401)
        );
        assert_eq!(
            Incoming::new(u64::MAX - 3).unwrap_err(),
            IncomingError::TooLarge(u64::MAX - 3)
        );
    }
}
