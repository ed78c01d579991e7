//! A map split into 2^k shards, each behind its own lock.
//!
//! Connection tasks update per-site state concurrently while the status API and the round
//! driver read it. One global lock would serialise them all; with shards chosen by the key's
//! hash, tasks for different sites rarely meet. Locks are std mutexes held only for the
//! closure passed in, which cannot `.await`, so no lock is ever held across a suspension
//! point. Each shard counts acquisitions and the time spent waiting for its lock, so
//! contention is visible per shard.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

#[derive(Debug, Default)]
struct Shard<K, V> {
    map: Mutex<HashMap<K, V>>,
    acquisitions: AtomicU64,
    wait_nanos: AtomicU64,
}

/// Per-shard lock statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub acquisitions: u64,
    pub wait_nanos: u64,
    pub len: usize,
}

#[derive(Debug)]
pub struct ShardedMap<K, V> {
    shards: Vec<Shard<K, V>>,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    /// A map with 2^`log2_shards` shards.
    pub fn new(log2_shards: u32) -> Self {
        let n = 1usize << log2_shards.min(16);
        ShardedMap {
            shards: (0..n)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::new()),
                    acquisitions: AtomicU64::new(0),
                    wait_nanos: AtomicU64::new(0),
                })
                .collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, V> {
        let i = self.hasher.hash_one(key) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    fn lock<'a>(shard: &'a Shard<K, V>) -> MutexGuard<'a, HashMap<K, V>> {
        let start = Instant::now();
        // A panic while holding a shard lock leaves plain data behind, still consistent for
        // our single-operation closures: keep serving rather than poisoning the coordinator.
        let guard = shard.map.lock().unwrap_or_else(|p| p.into_inner());
        shard.acquisitions.fetch_add(1, Ordering::Relaxed);
        shard
            .wait_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        guard
    }

    /// Runs `f` on the entry for `key` (inserting `default()` first if absent).
    pub fn update<R>(
        &self,
        key: &K,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let mut map = Self::lock(self.shard(key));
        let v = map.entry(key.clone()).or_insert_with(default);
        f(v)
    }

    pub fn insert(&self, key: K, value: V) -> Option<V> {
        let mut map = Self::lock(self.shard(&key));
        map.insert(key, value)
    }

    pub fn get(&self, key: &K) -> Option<V> {
        Self::lock(self.shard(key)).get(key).cloned()
    }

    pub fn remove(&self, key: &K) -> Option<V> {
        Self::lock(self.shard(key)).remove(key)
    }

    /// A copy of every entry (each shard locked in turn, never two at once).
    pub fn snapshot(&self) -> Vec<(K, V)> {
        self.shards
            .iter()
            .flat_map(|s| {
                Self::lock(s)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Each shard's entries, or None for a shard whose lock is taken. Never blocks: the panic
    /// hook calls it, possibly on a thread that holds a shard's lock.
    pub fn try_shards(&self) -> Vec<Option<Vec<(K, V)>>> {
        self.shards
            .iter()
            .map(|s| {
                let map = match s.map.try_lock() {
                    Ok(m) => m,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return None,
                };
                Some(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            })
            .collect()
    }

    pub fn stats(&self) -> Vec<ShardStats> {
        self.shards
            .iter()
            .map(|s| {
                // Not counted: the sampler behind the dashboard's heat map reads these every
                // few seconds, and its own visits would show as contention on every shard.
                let len = s.map.lock().unwrap_or_else(|p| p.into_inner()).len();
                ShardStats {
                    acquisitions: s.acquisitions.load(Ordering::Relaxed),
                    wait_nanos: s.wait_nanos.load(Ordering::Relaxed),
                    len,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_updates_are_all_counted() {
        let map = Arc::new(ShardedMap::<u32, u64>::new(3));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u32 {
                        map.update(&(i % 50), || 0, |v| *v += 1);
                        if i % 7 == t {
                            let _ = map.get(&i);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let snap = map.snapshot();
        assert_eq!(snap.len(), 50);
        assert_eq!(snap.iter().map(|(_, v)| v).sum::<u64>(), 4000);
        let stats = map.stats();
        assert_eq!(stats.len(), 8);
        assert!(stats.iter().map(|s| s.acquisitions).sum::<u64>() >= 4000);
        assert_eq!(stats.iter().map(|s| s.len).sum::<usize>(), 50);
        assert_eq!(map.remove(&3), Some(80));
        assert_eq!(map.get(&3), None);
    }
}
