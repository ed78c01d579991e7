//! A running sum split by index range, for uploads that are added while they stream in.
//!
//! Sites upload their vectors as streams of chunks, read by one connection task per site. If
//! the coordinator waited for whole vectors it would hold one vector per site at once
//! (O(sites × d)); instead each chunk is added where it belongs as soon as it arrives and then
//! dropped, so memory is one sum plus the chunks in flight.
//!
//! The sum is split into ranges of `shard_len` elements, each behind its own lock. Two sites
//! adding at different positions never wait for each other; two at the same position wait for
//! one range's addition (microseconds). A lock is a std mutex held for one range only, never
//! across an `.await` and never two at once, so there is no lock order to get wrong. Each range
//! counts its acquisitions and the time spent waiting for it, so contention can be measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use thiserror::Error;

/// Elements per range: 32 Ki elements (128 KiB of u32) stay in L2 while a chunk is added,
/// and a 4 MiB chunk touches at most a few dozen locks.
pub const DEFAULT_SHARD_LEN: usize = 1 << 15;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("elements {offset}..{end} are outside a sum of {len}")]
pub struct OutOfRange {
    pub offset: usize,
    pub end: usize,
    pub len: usize,
}

#[derive(Debug)]
struct Shard<T> {
    values: Mutex<Vec<T>>,
    acquisitions: AtomicU64,
    wait_nanos: AtomicU64,
}

/// Lock statistics of one index range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeStats {
    pub start: usize,
    pub acquisitions: u64,
    pub wait_nanos: u64,
}

#[derive(Debug)]
pub struct ShardedAccumulator<T> {
    shards: Vec<Shard<T>>,
    shard_len: usize,
    len: usize,
}

impl<T: Copy + Default> ShardedAccumulator<T> {
    /// A zero sum of `len` elements in ranges of `shard_len` (at least 1).
    pub fn new(len: usize, shard_len: usize) -> Self {
        let shard_len = shard_len.max(1);
        let shards = (0..len.div_ceil(shard_len))
            .map(|i| Shard {
                values: Mutex::new(vec![T::default(); shard_len.min(len - i * shard_len)]),
                acquisitions: AtomicU64::new(0),
                wait_nanos: AtomicU64::new(0),
            })
            .collect();
        ShardedAccumulator {
            shards,
            shard_len,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn lock(shard: &Shard<T>) -> MutexGuard<'_, Vec<T>> {
        let start = Instant::now();
        // A panic inside `f` leaves numbers behind, not broken invariants; the round that
        // owns the sum is abandoned by its driver anyway.
        let guard = shard.values.lock().unwrap_or_else(|p| p.into_inner());
        shard.acquisitions.fetch_add(1, Ordering::Relaxed);
        shard
            .wait_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        guard
    }

    /// Updates elements `offset..offset + count`: `f(part, first)` is called once per range
    /// with the locked part of the sum and the index, counted from `offset`, of its first
    /// element. Ranges are visited in order, each locked only while `f` runs on it.
    pub fn update(
        &self,
        offset: usize,
        count: usize,
        mut f: impl FnMut(&mut [T], usize),
    ) -> Result<(), OutOfRange> {
        let end = offset.checked_add(count).filter(|&e| e <= self.len);
        let Some(end) = end else {
            return Err(OutOfRange {
                offset,
                end: offset.saturating_add(count),
                len: self.len,
            });
        };
        let mut i = offset;
        while i < end {
            let shard = i / self.shard_len;
            let within = i - shard * self.shard_len;
            let n = (self.shard_len - within).min(end - i);
            let mut values = Self::lock(&self.shards[shard]);
            f(&mut values[within..within + n], i - offset);
            i += n;
        }
        Ok(())
    }

    /// Moves the sum out as its ranges, leaving them empty. No copy: joining the ranges into
    /// one vector would need a second sum's worth of memory just when memory is tightest.
    pub fn take(&self) -> Ranges<T> {
        Ranges(
            self.shards
                .iter()
                .map(|s| std::mem::take(&mut *Self::lock(s)))
                .collect(),
        )
    }

    /// Calls `f` on every range in index order, each locked only while `f` runs on it.
    pub fn for_each_range(&self, mut f: impl FnMut(&mut [T])) {
        for shard in &self.shards {
            f(&mut Self::lock(shard));
        }
    }

    pub fn stats(&self) -> Vec<RangeStats> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| RangeStats {
                start: i * self.shard_len,
                acquisitions: s.acquisitions.load(Ordering::Relaxed),
                wait_nanos: s.wait_nanos.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A finished sum, still split into its index ranges (in order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ranges<T>(Vec<Vec<T>>);

impl<T: Copy> Ranges<T> {
    pub fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }

    /// The ranges in index order.
    pub fn parts(&self) -> impl Iterator<Item = &[T]> {
        self.0.iter().map(Vec::as_slice)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flatten()
    }

    pub fn get(&self, mut i: usize) -> Option<T> {
        for part in &self.0 {
            if i < part.len() {
                return Some(part[i]);
            }
            i -= part.len();
        }
        None
    }

    /// The whole sum in one vector (a copy).
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().copied().collect()
    }
}

/// Turns a byte stream into whole fixed-width elements across arbitrary chunk boundaries:
/// a chunk may end in the middle of an element, whose first bytes are carried to the next.
#[derive(Debug, Clone, Default)]
pub struct ElementCarry {
    carry: [u8; 8],
    len: usize,
}

impl ElementCarry {
    /// Bytes of an incomplete element held back.
    pub fn pending(&self) -> usize {
        self.len
    }

    /// Calls `sink` with slices of whole `width`-byte elements (`width` ≤ 8), in order.
    pub fn feed(&mut self, width: usize, mut bytes: &[u8], mut sink: impl FnMut(&[u8])) {
        if self.len > 0 {
            let need = (width - self.len).min(bytes.len());
            self.carry[self.len..self.len + need].copy_from_slice(&bytes[..need]);
            self.len += need;
            bytes = &bytes[need..];
            if self.len < width {
                return;
            }
            let whole = self.carry;
            sink(&whole[..width]);
            self.len = 0;
        }
        let whole = bytes.len() / width * width;
        if whole > 0 {
            sink(&bytes[..whole]);
        }
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_streams_add_to_the_exact_sum() {
        let len = 10_007;
        let acc = Arc::new(ShardedAccumulator::<u32>::new(len, 64));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let acc = acc.clone();
                std::thread::spawn(move || {
                    // Each thread streams its vector v[i] = i * (t + 1) in chunks of 97.
                    let mut offset = 0;
                    while offset < len {
                        let n = 97.min(len - offset);
                        acc.update(offset, n, |part, first| {
                            for (j, a) in part.iter_mut().enumerate() {
                                let i = (offset + first + j) as u32;
                                *a = a.wrapping_add(i.wrapping_mul(t + 1));
                            }
                        })
                        .expect("in range");
                        offset += n;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let sum = acc.take().to_vec();
        assert_eq!(sum.len(), len);
        for (i, v) in sum.iter().enumerate() {
            assert_eq!(*v, (i as u32).wrapping_mul(10), "element {i}");
        }
        let stats = acc.stats();
        assert_eq!(stats.len(), len.div_ceil(64));
        assert_eq!(stats[1].start, 64);
        assert!(stats.iter().all(|s| s.acquisitions >= 4));
    }

    #[test]
    fn out_of_range_updates_are_refused_and_touch_nothing() {
        let acc = ShardedAccumulator::<u64>::new(10, 4);
        let mut calls = 0;
        let err = acc.update(8, 3, |_, _| calls += 1).unwrap_err();
        assert_eq!(
            err,
            OutOfRange {
                offset: 8,
                end: 11,
                len: 10
            }
        );
        assert!(acc.update(usize::MAX, 2, |_, _| calls += 1).is_err());
        assert_eq!(calls, 0);
        let sum = acc.take();
        assert_eq!(sum.to_vec(), vec![0; 10]);
        assert_eq!(
            sum.parts().map(<[u64]>::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(sum.get(9), Some(0));
        assert_eq!(sum.get(10), None);
    }

    #[test]
    fn elements_survive_any_chunk_boundary() {
        let values: Vec<u64> = (0..50u64).map(|i| i * 0x0101_0101_0101 + 7).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for step in [1, 3, 7, 8, 13, 400] {
            let mut carry = ElementCarry::default();
            let mut out = Vec::new();
            for chunk in bytes.chunks(step) {
                carry.feed(8, chunk, |whole| {
                    assert_eq!(whole.len() % 8, 0);
                    out.extend(
                        whole
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    );
                });
            }
            assert_eq!(out, values, "chunks of {step}");
            assert_eq!(carry.pending(), 0);
        }
    }
}
