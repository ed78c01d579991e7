//! The SecAgg+ decoders on arbitrary bytes: they return an error or a message, never panic,
//! and every message they accept re-encodes to bytes that decode and encode to the same
//! bytes. (Compared as bytes, not as messages: a decoded float may be NaN, which is never
//! equal to itself; values like a NaN clip pass the decoder and are refused by
//! `Params::validate`.)

#![no_main]

use cohort_protocols::secagg::{ClientMessage, MaskedInputPrefix, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClientMessage::<u32>::decode(data) {
        let bytes = m.encode();
        let again = ClientMessage::<u32>::decode(&bytes).expect("re-encoded message decodes");
        assert_eq!(again.encode(), bytes);
    }
    if let Ok(m) = ClientMessage::<u64>::decode(data) {
        let bytes = m.encode();
        let again = ClientMessage::<u64>::decode(&bytes).expect("re-encoded message decodes");
        assert_eq!(again.encode(), bytes);
    }
    if let Ok(m) = ServerMessage::decode(data) {
        let bytes = m.encode();
        let again = ServerMessage::decode(&bytes).expect("re-encoded message decodes");
        assert_eq!(again.encode(), bytes);
    }
    let _ = MaskedInputPrefix::decode(data);
});
