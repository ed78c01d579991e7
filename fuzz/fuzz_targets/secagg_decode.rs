//! The SecAgg+ decoders on arbitrary bytes: they return an error or a message, never panic,
//! and every message they accept encodes back to bytes that decode to the same message.

#![no_main]

use cohort_protocols::secagg::{ClientMessage, MaskedInputPrefix, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClientMessage::<u32>::decode(data) {
        assert_eq!(ClientMessage::<u32>::decode(&m.encode()).ok(), Some(m));
    }
    if let Ok(m) = ClientMessage::<u64>::decode(data) {
        assert_eq!(ClientMessage::<u64>::decode(&m.encode()).ok(), Some(m));
    }
    if let Ok(m) = ServerMessage::decode(data) {
        assert_eq!(ServerMessage::decode(&m.encode()).ok(), Some(m));
    }
    let _ = MaskedInputPrefix::decode(data);
});
