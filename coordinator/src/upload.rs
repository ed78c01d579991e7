//! Where a site's streamed update goes while an aggregation is open.
//!
//! Updates are the only large thing agents send. Each connection task feeds its site's chunks
//! straight into the site's slot, which adds them to a sum sharded by index range
//! ([`ShardedAccumulator`]), so uploads from many sites are added in parallel and none is ever
//! held whole. Secure rounds use the SecAgg+ server's own [`InputSlot`]s; plain comparison
//! rounds use a [`PlainSlot`] with the same life cycle.

use std::sync::{Arc, Mutex};

use cohort_protocols::secagg::accumulator::{
    DEFAULT_SHARD_LEN, ElementCarry, Ranges, ShardedAccumulator,
};
use cohort_protocols::secagg::{InputSlot, Word};

/// A site's slot in the open aggregation, and the round it belongs to (for the logs).
#[derive(Debug, Clone)]
pub struct OpenUpload {
    pub round: u64,
    pub sink: UploadSink,
}

/// Where a site's update goes.
#[derive(Debug, Clone)]
pub enum UploadSink {
    Masked32(Arc<InputSlot<u32>>),
    Masked64(Arc<InputSlot<u64>>),
    Plain(Arc<PlainSlot>),
}

impl UploadSink {
    /// Feeds the next chunk; true once the update is complete.
    pub fn feed(&self, bytes: &[u8], last: bool) -> Result<bool, String> {
        match self {
            UploadSink::Masked32(s) => s.feed(bytes, last).map_err(|e| e.to_string()),
            UploadSink::Masked64(s) => s.feed(bytes, last).map_err(|e| e.to_string()),
            UploadSink::Plain(s) => s.feed(bytes, last),
        }
    }

    /// The site's upload reached the coordinator but was refused before any of it was fed
    /// (the memory budget): from the site's side its input was sent, so it is spent for the
    /// round all the same.
    pub fn arrived_unfed(&self) {
        match self {
            UploadSink::Masked32(s) => s.arrived_unfed(),
            UploadSink::Masked64(s) => s.arrived_unfed(),
            UploadSink::Plain(_) => {}
        }
    }
}

/// The ring elements a SecAgg+ round can use, each with its kind of sink.
pub trait SinkWord: Word {
    fn sink(slot: Arc<InputSlot<Self>>) -> UploadSink;
}

impl SinkWord for u32 {
    fn sink(slot: Arc<InputSlot<u32>>) -> UploadSink {
        UploadSink::Masked32(slot)
    }
}

impl SinkWord for u64 {
    fn sink(slot: Arc<InputSlot<u64>>) -> UploadSink {
        UploadSink::Masked64(slot)
    }
}

/// The sum of a plain aggregation.
#[derive(Debug)]
pub enum PlainSum {
    /// Statistics: u64 vectors added with wrapping (their sums are exact integers).
    Integer(ShardedAccumulator<u64>),
    /// Training updates `[w, Δ…]` as f32: `sum[0] = Σw`, `sum[i] = Σ w·Δi`, in f64.
    Weighted(ShardedAccumulator<f64>),
}

impl PlainSum {
    pub fn new(len: usize, integer: bool) -> Self {
        if integer {
            PlainSum::Integer(ShardedAccumulator::new(len, DEFAULT_SHARD_LEN))
        } else {
            PlainSum::Weighted(ShardedAccumulator::new(len, DEFAULT_SHARD_LEN))
        }
    }

    fn len(&self) -> usize {
        match self {
            PlainSum::Integer(a) => a.len(),
            PlainSum::Weighted(a) => a.len(),
        }
    }

    fn width(&self) -> usize {
        match self {
            PlainSum::Integer(_) => 8,
            PlainSum::Weighted(_) => 4,
        }
    }

    /// The sum, moved out.
    pub fn take(&self) -> PlainTotals {
        match self {
            PlainSum::Integer(a) => PlainTotals::Integer(a.take()),
            PlainSum::Weighted(a) => PlainTotals::Weighted(a.take()),
        }
    }
}

/// A finished plain sum.
#[derive(Debug)]
pub enum PlainTotals {
    Integer(Ranges<u64>),
    Weighted(Ranges<f64>),
}

#[derive(Debug)]
enum PlainState {
    Open {
        added: usize,
        weight: f64,
        carry: ElementCarry,
    },
    Complete,
    Failed {
        tainted: bool,
    },
    Sealed,
}

/// How a plain slot ended when the aggregation closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainOutcome {
    Complete,
    /// Nothing was added: the site simply counts as dropped.
    Missing,
    /// Part of the update is in the sum.
    Partial,
}

/// One site's plain update, streamed into a [`PlainSum`]. The lock is the site's own; only
/// sealing contends for it.
#[derive(Debug)]
pub struct PlainSlot {
    sum: Arc<PlainSum>,
    /// A training update's weight is capped at this, as a secure round caps it at the site
    /// (`secagg.max_weight`): one site claiming a billion examples cannot take over the mean.
    max_weight: f64,
    state: Mutex<PlainState>,
    /// With a robust aggregation rule (`[aggregation]`), the site's weight and update, kept
    /// whole beside the sum: the rule needs every update, which only plain mode shows. The
    /// site's own lock guards it.
    kept: Option<Mutex<(f64, Vec<f32>)>>,
}

impl PlainSlot {
    pub fn new(sum: Arc<PlainSum>) -> Self {
        Self::capped(sum, f64::INFINITY)
    }

    pub fn capped(sum: Arc<PlainSum>, max_weight: f64) -> Self {
        PlainSlot {
            sum,
            max_weight,
            state: Mutex::new(PlainState::Open {
                added: 0,
                weight: 0.0,
                carry: ElementCarry::default(),
            }),
            kept: None,
        }
    }

    /// As [`PlainSlot::capped`], also keeping the update for [`PlainSlot::take_update`].
    pub fn keeping(sum: Arc<PlainSum>, max_weight: f64) -> Self {
        PlainSlot {
            kept: Some(Mutex::new((0.0, Vec::new()))),
            ..Self::capped(sum, max_weight)
        }
    }

    /// The kept (capped weight, delta), once, for a slot that sealed
    /// [`PlainOutcome::Complete`] (the driver asks no other): None for a slot that keeps
    /// nothing, and for one whose update stopped short of the model's length.
    pub fn take_update(&self) -> Option<(f64, Vec<f32>)> {
        let mut kept = self
            .kept
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let whole = self.sum.len().saturating_sub(1);
        (kept.1.len() == whole).then(|| std::mem::take(&mut *kept))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PlainState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn feed(&self, bytes: &[u8], last: bool) -> Result<bool, String> {
        let mut state = self.state();
        let PlainState::Open {
            added,
            weight,
            carry,
        } = &mut *state
        else {
            return Err(match &*state {
                PlainState::Complete => "a second update from the same site".into(),
                PlainState::Sealed => "the aggregation has closed".into(),
                _ => "the site's update was already refused".into(),
            });
        };
        let mut kept = self
            .kept
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()));
        let result = add_chunk(
            &self.sum,
            self.max_weight,
            added,
            weight,
            carry,
            bytes,
            last,
            kept.as_deref_mut(),
        );
        let tainted = *added > 0;
        match result {
            Ok(true) => *state = PlainState::Complete,
            Ok(false) => {}
            Err(_) => *state = PlainState::Failed { tainted },
        }
        result
    }

    /// Whether nothing more will change before the deadline.
    pub fn settled(&self) -> bool {
        matches!(
            *self.state(),
            PlainState::Complete | PlainState::Failed { .. }
        )
    }

    pub fn seal(&self) -> PlainOutcome {
        let mut state = self.state();
        let outcome = match &*state {
            PlainState::Complete => PlainOutcome::Complete,
            PlainState::Open { added: 0, .. } | PlainState::Sealed => PlainOutcome::Missing,
            PlainState::Failed { tainted: false } => PlainOutcome::Missing,
            PlainState::Open { .. } | PlainState::Failed { tainted: true } => PlainOutcome::Partial,
        };
        *state = PlainState::Sealed;
        outcome
    }
}

/// Adds one chunk's whole elements; every element is checked before any is added, so a
/// refused chunk leaves the sum as it was.
#[allow(clippy::too_many_arguments)]
fn add_chunk(
    sum: &PlainSum,
    max_weight: f64,
    added: &mut usize,
    weight: &mut f64,
    carry: &mut ElementCarry,
    bytes: &[u8],
    last: bool,
    kept: Option<&mut (f64, Vec<f32>)>,
) -> Result<bool, String> {
    let (len, width) = (sum.len(), sum.width());
    let available = (carry.pending() + bytes.len()) / width;
    if *added + available > len {
        return Err(format!(
            "the update has more than the {len} elements of this round"
        ));
    }
    // The chunk's whole elements (a copy of at most one chunk; the plain path is only for
    // comparison runs, and checking every element before adding keeps refusals clean).
    let mut whole = Vec::with_capacity(available * width);
    carry.feed(width, bytes, |w| whole.extend_from_slice(w));
    let at = *added;
    let count = whole.len() / width;
    let range = match sum {
        PlainSum::Integer(acc) => acc.update(at, count, |part, first| {
            for (a, e) in part.iter_mut().zip(whole[first * 8..].chunks_exact(8)) {
                *a = a.wrapping_add(u64::from_le_bytes(e.try_into().unwrap_or([0; 8])));
            }
        }),
        PlainSum::Weighted(acc) => {
            let values: Vec<f32> = whole
                .chunks_exact(4)
                .map(|e| f32::from_le_bytes([e[0], e[1], e[2], e[3]]))
                .collect();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(format!("element {} is not a finite number", at + i));
            }
            if at == 0
                && let Some(&w) = values.first()
            {
                if w < 0.0 {
                    return Err(format!("the update's weight {w} is negative"));
                }
                *weight = (w as f64).min(max_weight);
            }
            let w = *weight;
            if let Some(kept) = kept {
                kept.0 = w;
                kept.1
                    .extend_from_slice(&values[usize::from(at == 0).min(values.len())..]);
            }
            acc.update(at, values.len(), |part, first| {
                for (j, (a, v)) in part.iter_mut().zip(&values[first..]).enumerate() {
                    // Element 0 is the weight itself: Σw. The others are weighted: Σ w·Δ.
                    *a += if at + first + j == 0 {
                        w
                    } else {
                        w * *v as f64
                    };
                }
            })
        }
    };
    range.map_err(|e| e.to_string())?;
    *added += count;
    if *added == len && carry.pending() == 0 {
        return if last {
            Ok(true)
        } else {
            Err("the update is complete but not marked as the last chunk".into())
        };
    }
    if last {
        return Err(format!(
            "the update ended after {} of {len} elements",
            *added
        ));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(weight: f32, delta: &[f32]) -> Vec<u8> {
        std::iter::once(weight)
            .chain(delta.iter().copied())
            .flat_map(f32::to_le_bytes)
            .collect()
    }

    /// A keeping slot hands back exactly the update it summed (weight capped), once; one
    /// that stopped part-way hands back nothing.
    #[test]
    fn a_keeping_slot_returns_the_whole_update_it_summed() {
        let sum = Arc::new(PlainSum::new(4, false));
        let a = PlainSlot::keeping(sum.clone(), 10.0);
        let b = PlainSlot::keeping(sum.clone(), 10.0);
        let ua = update(50.0, &[1.0, -1.0, 0.5]);
        for (i, c) in ua.chunks(5).enumerate() {
            let last = (i + 1) * 5 >= ua.len();
            assert_eq!(a.feed(c, last), Ok(last));
        }
        assert_eq!(b.feed(&update(1.0, &[2.0])[..8], false), Ok(false));
        assert_eq!(a.seal(), PlainOutcome::Complete);
        assert_eq!(b.seal(), PlainOutcome::Partial);
        assert_eq!(a.take_update(), Some((10.0, vec![1.0, -1.0, 0.5])));
        assert_eq!(a.take_update(), None);
        assert_eq!(b.take_update(), None);
        assert_eq!(PlainSlot::new(sum).take_update(), None);
    }

    #[test]
    fn weighted_updates_stream_into_the_weighted_sum() {
        let sum = Arc::new(PlainSum::new(4, false));
        let a = PlainSlot::new(sum.clone());
        let b = PlainSlot::new(sum.clone());
        let ua = update(2.0, &[1.0, -1.0, 0.5]);
        let ub = update(3.0, &[2.0, 0.0, -0.5]);
        for (i, c) in ua.chunks(3).enumerate() {
            let last = (i + 1) * 3 >= ua.len();
            assert_eq!(a.feed(c, last), Ok(last));
        }
        assert_eq!(b.feed(&ub, true), Ok(true));
        assert_eq!(a.seal(), PlainOutcome::Complete);
        assert_eq!(b.seal(), PlainOutcome::Complete);
        let PlainTotals::Weighted(s) = sum.take() else {
            panic!("a weighted sum")
        };
        assert_eq!(s.to_vec(), vec![5.0, 8.0, -2.0, -0.5]);
    }

    #[test]
    fn bad_updates_are_refused_and_partial_ones_reported() {
        let sum = Arc::new(PlainSum::new(3, false));
        let heavy = Arc::new(PlainSum::new(3, false));
        let capped = PlainSlot::capped(heavy.clone(), 10.0);
        assert_eq!(capped.feed(&update(1e9, &[1.0, -2.0]), true), Ok(true));
        let PlainTotals::Weighted(total) = heavy.take() else {
            panic!("weighted")
        };
        assert_eq!(
            total.to_vec(),
            vec![10.0, 10.0, -20.0],
            "weight capped at 10"
        );
        let nan = PlainSlot::new(sum.clone());
        let err = nan.feed(&update(1.0, &[f32::NAN, 1.0]), true).unwrap_err();
        assert!(err.contains("element 1 is not a finite number"), "{err}");
        assert_eq!(nan.seal(), PlainOutcome::Missing);

        let long = PlainSlot::new(sum.clone());
        let err = long.feed(&update(1.0, &[1.0, 1.0, 1.0]), true).unwrap_err();
        assert!(err.contains("more than the 3 elements"), "{err}");

        let cut = PlainSlot::new(sum.clone());
        let u = update(1.0, &[1.0, 1.0]);
        assert_eq!(cut.feed(&u[..8], false), Ok(false));
        assert_eq!(cut.seal(), PlainOutcome::Partial);
        assert!(cut.feed(&u[8..], true).is_err(), "sealed");

        let stopped = PlainSlot::new(sum);
        assert!(stopped.feed(&u[..8], true).is_err());
        assert_eq!(stopped.seal(), PlainOutcome::Partial);
    }

    #[test]
    fn integer_sums_wrap() {
        let sum = Arc::new(PlainSum::new(2, true));
        for v in [[u64::MAX, 1], [2, 3]] {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(PlainSlot::new(sum.clone()).feed(&bytes, true), Ok(true));
        }
        let PlainTotals::Integer(s) = sum.take() else {
            panic!("an integer sum")
        };
        assert_eq!(s.to_vec(), vec![1, 4]);
    }
}
