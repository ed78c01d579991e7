//! The gRPC session's messages as the coordinator and the agent receive them: protobuf
//! decoding, then the SecAgg+ payload a chunk carries (a whole message in one chunk), then the
//! data schema an agent sends in its Join.

#![no_main]

use cohort_proto::v1::{AgentMessage, CoordinatorMessage, agent_message, coordinator_message};
use cohort_protocols::model::DataSchema;
use cohort_protocols::secagg::{ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Re-encoding is stable (compared as bytes: a float field may be NaN).
fn round_trip<M: Message + Default>(m: &M) {
    let bytes = m.encode_to_vec();
    let again = M::decode(bytes.as_slice()).expect("re-encoded message decodes");
    assert_eq!(again.encode_to_vec(), bytes);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = AgentMessage::decode(data) {
        match &m.kind {
            Some(agent_message::Kind::Secagg(c)) => {
                let _ = ClientMessage::<u64>::decode(&c.data);
            }
            Some(agent_message::Kind::Join(j)) => {
                if let Ok(schema) = toml::from_str::<DataSchema>(&j.schema_toml) {
                    let _ = schema.hash();
                }
            }
            _ => {}
        }
        round_trip(&m);
    }
    if let Ok(m) = CoordinatorMessage::decode(data) {
        if let Some(coordinator_message::Kind::Secagg(c)) = &m.kind {
            let _ = ServerMessage::decode(&c.data);
        }
        round_trip(&m);
    }
});
