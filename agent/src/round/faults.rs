//! Deliberate misbehaviour (`[[faults]]` in agent.toml) for simulations and tests: a site
//! that vanishes or dies mid-upload at a chosen stage, sends a truncated or out-of-range
//! masked input, or a poisoned update.
//!
//! Compiled in only with the `faults` cargo feature (cohort-sim and the coordinator's tests
//! enable it). Without it [`Injector`] is an empty type whose methods change nothing, so a
//! production agent has no code that misbehaves — and its configuration refuses `[[faults]]`
//! besides ([`crate::config`]).

#[cfg(feature = "faults")]
mod enabled {
    use cohort_protocols::secagg::{ClientMessage, QuantisedInput, Word};

    use crate::config::{Fault, FaultAction, FaultStage};

    /// The faults to inject and those already injected. Outlives sessions: each fault fires
    /// once, not again after the reconnection it caused.
    #[derive(Debug, Default)]
    pub(crate) struct Injector {
        faults: Vec<Fault>,
        fired: Vec<Fault>,
    }

    impl Injector {
        pub(crate) fn new(faults: &[Fault]) -> Self {
            Injector {
                faults: faults.to_vec(),
                fired: Vec::new(),
            }
        }

        fn alters_input(&self, round: u64, action: FaultAction) -> bool {
            self.faults.iter().any(|f| {
                f.round == round && f.stage == FaultStage::MaskedInput && f.action == action
            })
        }

        /// The quantised input as a faulty site feeds it to the protocol: with a clipped
        /// count no honest input can have (`out_of_range`), so only the unmasked sum shows it.
        pub(in crate::round) fn quantised<W: Word>(
            &self,
            round: u64,
            q: QuantisedInput<W>,
        ) -> QuantisedInput<W> {
            if !self.alters_input(round, FaultAction::OutOfRange) {
                return q;
            }
            let mut values = q.values().to_vec();
            if let Some(c) = values.get_mut(cohort_protocols::secagg::quant::CLIPPED_INDEX) {
                *c = W::from_u64_wrapping(u64::from(u32::MAX));
            }
            QuantisedInput::from_values(values)
        }

        /// The update as a poisoning site sends it: −10 times what it trained (`poison`),
        /// its sign flipped (`sign_flip`), or noise unrelated to its data (`random`: each
        /// value from N(0, 1), drawn from a generator seeded by the round, so runs repeat).
        pub(in crate::round) fn update(&self, round: u64, mut delta: Vec<f32>) -> Vec<f32> {
            if self.alters_input(round, FaultAction::Poison) {
                for d in &mut delta {
                    *d *= -10.0;
                }
            }
            if self.alters_input(round, FaultAction::SignFlip) {
                for d in &mut delta {
                    *d = -*d;
                }
            }
            if self.alters_input(round, FaultAction::Random) {
                use rand_core::{Rng, SeedableRng};
                let mut rng = chacha20::ChaCha20Rng::seed_from_u64(round);
                let mut uniform = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                for d in &mut delta {
                    let (u, v) = (uniform(), uniform());
                    *d = ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32;
                }
            }
            delta
        }

        /// The message as a faulty site sends it: a masked input one element short
        /// (`truncate`).
        pub(in crate::round) fn message<W: Word>(&self, round: u64, m: &mut ClientMessage<W>) {
            if self.alters_input(round, FaultAction::Truncate)
                && let ClientMessage::MaskedInput(x) = m
            {
                x.values.pop();
            }
        }

        /// A fault that replaces the message of `stage` in `round` (`vanish`, `interrupt`),
        /// if one is due and has not fired yet; it counts as fired from here on.
        pub(in crate::round) fn fire(
            &mut self,
            round: u64,
            stage: FaultStage,
        ) -> Option<FaultAction> {
            let due = self.faults.iter().find(|f| {
                f.round == round
                    && f.stage == stage
                    && matches!(f.action, FaultAction::Vanish | FaultAction::Interrupt)
                    && !self.fired.contains(f)
            })?;
            let due = due.clone();
            let action = due.action;
            self.fired.push(due);
            Some(action)
        }
    }
}

#[cfg(not(feature = "faults"))]
mod disabled {
    use cohort_protocols::secagg::{ClientMessage, QuantisedInput, Word};

    use crate::config::Fault;

    /// Fault injection is not built in: nothing to inject.
    #[derive(Debug, Default)]
    pub(crate) struct Injector;

    impl Injector {
        pub(crate) fn new(_faults: &[Fault]) -> Self {
            Injector
        }

        pub(in crate::round) fn quantised<W: Word>(
            &self,
            _round: u64,
            q: QuantisedInput<W>,
        ) -> QuantisedInput<W> {
            q
        }

        pub(in crate::round) fn message<W: Word>(&self, _round: u64, _m: &mut ClientMessage<W>) {}

        pub(in crate::round) fn update(&self, _round: u64, delta: Vec<f32>) -> Vec<f32> {
            delta
        }
    }
}

#[cfg(feature = "faults")]
pub(crate) use enabled::Injector;

#[cfg(not(feature = "faults"))]
pub(crate) use disabled::Injector;
