//! The SecAgg+ neighbour graph (Bell et al. 2020): a random Harary-style ring.
//!
//! Participants are shuffled by a PRG keyed with a public per-round seed and placed on a ring;
//! each is a neighbour of the (k - 1) / 2 sites on either side. Every site can recompute the
//! graph from the seed and the participant list, so the server cannot hand different sites
//! different graphs. With k = n it is the complete graph of classic SecAgg.
//!
//! The neighbourhood of a site includes the site itself: it holds a share of its own secrets,
//! exactly as in Bonawitz et al., where a user shares among all users including itself.

use std::collections::HashMap;

use chacha20::ChaCha20Rng;
use hkdf::Hkdf;
use rand_core::{Rng, SeedableRng};
use sha2::Sha256;
use thiserror::Error;

use super::ClientId;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GraphError {
    #[error("participant {0} is listed twice")]
    DuplicateParticipant(ClientId),
    #[error("{participants} participants but the parameters say {sites} sites")]
    WrongCount { participants: usize, sites: u32 },
    #[error("neighbourhood size {neighbours} is invalid for {participants} participants")]
    BadNeighbours {
        neighbours: u32,
        participants: usize,
    },
}

/// The neighbour relation of one round attempt.
#[derive(Debug, Clone)]
pub struct NeighbourGraph {
    ring: Vec<ClientId>,
    position: HashMap<ClientId, usize>,
    /// (k - 1) / 2 neighbours on each side; `None` for the complete graph.
    half_width: Option<usize>,
}

impl NeighbourGraph {
    /// Builds the graph. `participants` may be in any order; the result depends only on the
    /// set, `neighbours` and `seed`.
    pub fn new(
        participants: &[ClientId],
        neighbours: u32,
        seed: &[u8; 32],
    ) -> Result<Self, GraphError> {
        let mut ring = participants.to_vec();
        ring.sort_unstable();
        if let Some(w) = ring.windows(2).find(|w| w[0] == w[1]) {
            return Err(GraphError::DuplicateParticipant(w[0]));
        }
        let n = ring.len();
        let k = neighbours as usize;
        if k < 1 || k > n || (k < n && k.is_multiple_of(2)) {
            return Err(GraphError::BadNeighbours {
                neighbours,
                participants: n,
            });
        }
        let mut key = [0u8; 32];
        // Domain-separate the shuffle from any other use of the round seed.
        Hkdf::<Sha256>::new(Some(b"cohort-secagg-v1/graph"), seed)
            .expand(b"shuffle", &mut key)
            .map_err(|_| GraphError::BadNeighbours {
                neighbours,
                participants: n,
            })?;
        let mut rng = ChaCha20Rng::from_seed(key);
        for i in (1..n).rev() {
            let j = uniform_below(&mut rng, i as u64 + 1) as usize;
            ring.swap(i, j);
        }
        let position = ring.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Ok(NeighbourGraph {
            ring,
            position,
            half_width: (k < n).then_some((k - 1) / 2),
        })
    }

    pub fn contains(&self, id: ClientId) -> bool {
        self.position.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Whether `a` and `b` are neighbours (every site is its own neighbour).
    pub fn are_neighbours(&self, a: ClientId, b: ClientId) -> bool {
        match (self.position.get(&a), self.position.get(&b)) {
            (Some(&pa), Some(&pb)) => match self.half_width {
                None => true,
                Some(h) => {
                    let d = pa.abs_diff(pb);
                    d.min(self.ring.len() - d) <= h
                }
            },
            _ => false,
        }
    }

    /// The neighbourhood of `id`, itself included, sorted by id. Empty if `id` is not in the
    /// round.
    pub fn neighbours(&self, id: ClientId) -> Vec<ClientId> {
        let Some(&p) = self.position.get(&id) else {
            return Vec::new();
        };
        let mut out: Vec<ClientId> = match self.half_width {
            None => self.ring.clone(),
            Some(h) => {
                let n = self.ring.len();
                (0..=2 * h)
                    .map(|o| self.ring[(p + n - h + o) % n])
                    .collect()
            }
        };
        out.sort_unstable();
        out
    }
}

/// An unbiased integer in `[0, bound)` by rejection.
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_symmetric_and_seed_dependent() {
        let ids: Vec<ClientId> = (100..131).collect();
        let g = NeighbourGraph::new(&ids, 7, &[1; 32]).unwrap();
        for &a in &ids {
            let nb = g.neighbours(a);
            assert_eq!(nb.len(), 7);
            assert!(nb.contains(&a));
            for &b in &ids {
                assert_eq!(g.are_neighbours(a, b), g.are_neighbours(b, a));
                assert_eq!(g.are_neighbours(a, b), nb.contains(&b));
            }
        }
        let shuffled: Vec<ClientId> = ids.iter().rev().copied().collect();
        let same = NeighbourGraph::new(&shuffled, 7, &[1; 32]).unwrap();
        let other = NeighbourGraph::new(&ids, 7, &[2; 32]).unwrap();
        assert!(ids.iter().all(|&a| g.neighbours(a) == same.neighbours(a)));
        assert!(ids.iter().any(|&a| g.neighbours(a) != other.neighbours(a)));
    }

    #[test]
    fn complete_graph_and_errors() {
        let ids = [5, 9, 2, 7];
        let g = NeighbourGraph::new(&ids, 4, &[0; 32]).unwrap();
        assert_eq!(g.neighbours(9), vec![2, 5, 7, 9]);
        assert!(g.neighbours(3).is_empty());
        assert_eq!(
            NeighbourGraph::new(&[1, 2, 2], 3, &[0; 32]).unwrap_err(),
            GraphError::DuplicateParticipant(2)
        );
        assert!(NeighbourGraph::new(&[1, 2, 3, 4, 5], 4, &[0; 32]).is_err());
    }
}
