//! Broadcast: announcing a round (or an evaluation) and sending the model to its sites.

use super::*;

impl Driver {
    pub(super) async fn start_round(
        &self,
        sites: &[(String, u32)],
        start: RoundStart,
        model: Option<&Bytes>,
    ) -> Vec<(String, u32)> {
        let mut reached = Vec::new();
        for (site, id) in sites {
            let mut ok = self
                .hub
                .send(site, coordinator_message::Kind::RoundStart(start.clone()))
                .await;
            if ok && let Some(bytes) = model {
                ok = self
                    .hub
                    .send_chunked(site, bytes, coordinator_message::Kind::Model)
                    .await;
            }
            if ok {
                reached.push((site.clone(), *id));
            } else {
                warn!(round = start.round, %site, "site unreachable at round start");
            }
        }
        reached
    }

    pub(super) fn round_start(
        &self,
        round: u64,
        attempt: u32,
        task: Task,
        model: Option<&[u8]>,
    ) -> RoundStart {
        let hash = model.map(model::sha3_512);
        RoundStart {
            round,
            attempt,
            task: task as i32,
            secure: self.secure(),
            model_sha3_512: hash.map(|h| h.to_vec()).unwrap_or_default(),
            model_signature: hash
                .map(|h| model::sign_model(&self.signing_key, &h).to_vec())
                .unwrap_or_default(),
            model_bytes: model.map_or(0, |m| m.len() as u64),
            training_toml: self.training_toml.clone(),
            feature_mean: self.mean.clone(),
            feature_std: self.std.clone(),
        }
    }
}
