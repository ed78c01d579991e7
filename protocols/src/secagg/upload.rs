//! One site's masked input, streamed into the round's sum as it arrives.
//!
//! When the masked-input stage opens, the server makes one [`InputSlot`] per site that is
//! expected to upload. The transport feeds the site's encoded `MaskedInput` into its slot chunk
//! by chunk, from the site's own connection task, so uploads from different sites are added
//! in parallel and no site's vector is ever held whole.
//!
//! The prefix (round, sender, width, count) is checked before any value is added, so a wrong
//! round, sender or length costs the site its place and nothing else. An upload that stops or
//! goes wrong *after* values were added has left part of a masked vector in the sum; that part
//! can only be removed by unmasking the site's own input, which the protocol forbids, so the
//! server aborts the attempt naming the site ([`super::AbortReason::PartialInput`]) and the
//! driver retries without it.

use std::sync::{Arc, Mutex};

use super::accumulator::{ElementCarry, ShardedAccumulator};
use super::messages::{MASKED_INPUT_PREFIX, MaskedInputPrefix};
use super::server::RejectReason;
use super::word::Word;
use super::{ClientId, RoundId};

#[derive(Debug)]
enum State {
    /// Reading the prefix (the bytes so far).
    Prefix(Vec<u8>),
    /// `added` values are in the sum.
    Values {
        added: usize,
        carry: ElementCarry,
    },
    Complete,
    /// Refused; `tainted` when values had reached the sum first.
    Failed {
        reason: RejectReason,
        tainted: bool,
    },
    /// The stage is closed: nothing more is added.
    Sealed,
}

/// How a slot ended, decided once when the stage closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Complete,
    /// Nothing arrived: an ordinary dropout.
    Missing,
    /// Refused before anything was added.
    Refused(RejectReason),
    /// Part of the input is in the sum.
    Partial,
}

/// A site's place in the masked-input stage. Shared between the server and the transport
/// task that reads the site's upload; the mutex is only ever contended by the server sealing
/// the stage, and sealing waits for a chunk being added to finish, so after the stage closes
/// no value can reach the sum.
#[derive(Debug)]
pub struct InputSlot<W: Word> {
    sender: ClientId,
    round: RoundId,
    acc: Arc<ShardedAccumulator<W>>,
    state: Mutex<State>,
    /// Set by the first byte fed, and never cleared (sealing keeps it): see [`Self::started`].
    arrived: std::sync::atomic::AtomicBool,
}

impl<W: Word> InputSlot<W> {
    pub(crate) fn new(sender: ClientId, round: RoundId, acc: Arc<ShardedAccumulator<W>>) -> Self {
        InputSlot {
            sender,
            round,
            acc,
            state: Mutex::new(State::Prefix(Vec::new())),
            arrived: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn sender(&self) -> ClientId {
        self.sender
    }

    /// Whether any byte of the site's masked input arrived. From then on the input may be
    /// in a sum the server can unmask (with its neighbours' shares, without the site's own),
    /// so an honest site that keeps a contribution ledger will not take part in another
    /// attempt of the round: the driver need not ask it.
    pub fn started(&self) -> bool {
        self.arrived.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The transport received the start of the site's upload but refused it before feeding
    /// any of it (a memory budget, say): nothing reaches the sum, yet [`Self::started`] holds,
    /// as the site sent its input.
    pub fn arrived_unfed(&self) {
        self.arrived
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds the next bytes of the site's encoded `MaskedInput`; `last` marks the end of the
    /// message. Returns true once the whole input is in the sum. After an error the slot
    /// refuses everything.
    pub fn feed(&self, bytes: &[u8], last: bool) -> Result<bool, RejectReason> {
        let mut state = self.state();
        if !bytes.is_empty() && !matches!(*state, State::Sealed) {
            self.arrived
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let result = self.advance(&mut state, bytes, last);
        if let Err(reason) = &result
            && !matches!(
                *state,
                State::Failed { .. } | State::Sealed | State::Complete
            )
        {
            let tainted = matches!(*state, State::Values { added, .. } if added > 0);
            *state = State::Failed {
                reason: reason.clone(),
                tainted,
            };
        }
        result
    }

    fn advance(
        &self,
        state: &mut State,
        mut bytes: &[u8],
        last: bool,
    ) -> Result<bool, RejectReason> {
        if let State::Prefix(buf) = state {
            let need = (MASKED_INPUT_PREFIX - buf.len()).min(bytes.len());
            buf.extend_from_slice(&bytes[..need]);
            bytes = &bytes[need..];
            if buf.len() < MASKED_INPUT_PREFIX {
                return if last {
                    Err(RejectReason::Malformed(format!(
                        "the upload ended after {} bytes, inside its {MASKED_INPUT_PREFIX}-byte prefix",
                        buf.len()
                    )))
                } else {
                    Ok(false)
                };
            }
            let prefix = MaskedInputPrefix::decode(buf)
                .map_err(|e| RejectReason::Malformed(e.to_string()))?;
            self.check(&prefix)?;
            *state = State::Values {
                added: 0,
                carry: ElementCarry::default(),
            };
        }
        match state {
            State::Values { added, carry } => {
                let expected = self.acc.len();
                let available = (carry.pending() + bytes.len()) / W::BYTES;
                if *added + available > expected {
                    return Err(RejectReason::WrongLength {
                        got: *added + available,
                        expected,
                    });
                }
                let acc = &self.acc;
                let mut range = Ok(());
                carry.feed(W::BYTES, bytes, |whole| {
                    let n = whole.len() / W::BYTES;
                    let at = *added;
                    range = range.and(acc.update(at, n, |part, first| {
                        let src = &whole[first * W::BYTES..(first + part.len()) * W::BYTES];
                        for (a, b) in part.iter_mut().zip(src.chunks_exact(W::BYTES)) {
                            *a = a.wrapping_add(W::read_le(b));
                        }
                    }));
                    *added += n;
                });
                range.map_err(|e| RejectReason::Malformed(e.to_string()))?;
                if *added == expected && carry.pending() == 0 {
                    if !last {
                        // More chunks would be trailing bytes: the message must end here.
                        return Err(RejectReason::Malformed(
                            "the upload is complete but not marked as the last chunk".into(),
                        ));
                    }
                    *state = State::Complete;
                    return Ok(true);
                }
                if last {
                    return Err(RejectReason::WrongLength {
                        got: *added,
                        expected,
                    });
                }
                Ok(false)
            }
            State::Complete => Err(RejectReason::Duplicate("MaskedInput")),
            State::Failed { .. } => Err(RejectReason::Excluded),
            State::Sealed => Err(RejectReason::Late),
            State::Prefix(_) => Ok(false),
        }
    }

    fn check(&self, prefix: &MaskedInputPrefix) -> Result<(), RejectReason> {
        if prefix.round != self.round {
            return Err(RejectReason::WrongRound { got: prefix.round });
        }
        if prefix.sender != self.sender {
            return Err(RejectReason::WrongSender {
                claimed: prefix.sender,
            });
        }
        if prefix.width != W::BYTES {
            return Err(RejectReason::Malformed(format!(
                "{}-byte elements, this round uses {}-byte elements",
                prefix.width,
                W::BYTES
            )));
        }
        if prefix.count != self.acc.len() {
            return Err(RejectReason::WrongLength {
                got: prefix.count,
                expected: self.acc.len(),
            });
        }
        Ok(())
    }

    /// Adds a whole decoded input (the sans-IO path, where messages arrive in one piece).
    pub(crate) fn add_whole(&self, values: &[W]) -> Result<(), RejectReason> {
        let mut state = self.state();
        match &*state {
            State::Prefix(buf) if buf.is_empty() => {}
            State::Complete => return Err(RejectReason::Duplicate("MaskedInput")),
            State::Sealed => return Err(RejectReason::Late),
            _ => return Err(RejectReason::Excluded),
        }
        self.arrived
            .store(true, std::sync::atomic::Ordering::Release);
        if values.len() != self.acc.len() {
            return Err(RejectReason::WrongLength {
                got: values.len(),
                expected: self.acc.len(),
            });
        }
        self.acc
            .update(0, values.len(), |part, first| {
                for (a, b) in part.iter_mut().zip(&values[first..]) {
                    *a = a.wrapping_add(*b);
                }
            })
            .map_err(|e| RejectReason::Malformed(e.to_string()))?;
        *state = State::Complete;
        Ok(())
    }

    /// Complete, or failed: nothing more will change before the deadline.
    pub(crate) fn settled(&self) -> bool {
        matches!(*self.state(), State::Complete | State::Failed { .. })
    }

    /// Closes the slot for good and says how it ended.
    pub(crate) fn seal(&self) -> Outcome {
        let mut state = self.state();
        let outcome = match &*state {
            State::Complete => Outcome::Complete,
            State::Prefix(_) => Outcome::Missing,
            State::Values { added: 0, .. } => Outcome::Missing,
            State::Values { .. } => Outcome::Partial,
            State::Failed { tainted: true, .. } => Outcome::Partial,
            State::Failed { reason, .. } => Outcome::Refused(reason.clone()),
            State::Sealed => Outcome::Missing,
        };
        *state = State::Sealed;
        outcome
    }
}
