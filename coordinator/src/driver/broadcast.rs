//! Broadcast: announcing a round (or an evaluation) and sending the model to its sites.

use super::*;

impl Driver {
    /// Announces a round (and sends its model) to all `sites` at once; returns those reached.
    /// The whole broadcast has one deadline, the stage timeout: a site that is not reading
    /// is disconnected then instead of holding up the round (see [`Hub::deliver`]).
    pub(super) async fn start_round(
        &self,
        sites: &[(String, u32)],
        start: RoundStart,
        model: Option<&Bytes>,
    ) -> Vec<(String, u32)> {
        let round = start.round;
        let mut items = vec![Outgoing::Message(coordinator_message::Kind::RoundStart(
            start,
        ))];
        if let Some(bytes) = model {
            items.push(Outgoing::Chunked(
                bytes.clone(),
                coordinator_message::Kind::Model,
            ));
        }
        let batches = sites
            .iter()
            .map(|(site, _)| (site.clone(), items.clone()))
            .collect();
        let deadline = tokio::time::Instant::now() + self.stage_timeout();
        let failed = self.hub.deliver(round, batches, deadline).await;
        for site in &failed {
            warn!(round, %site, "site unreachable at round start");
        }
        sites
            .iter()
            .filter(|(site, _)| !failed.contains(site))
            .cloned()
            .collect()
    }

    pub(super) fn stage_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.rounds.stage_timeout_secs)
    }

    /// How long a SecAgg+ stage's messages may take to reach their sites: a quarter of the
    /// stage, so the answers of the sites that read them still arrive before it closes.
    pub(super) fn control_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + (self.stage_timeout() / 4).max(Duration::from_secs(1))
    }

    /// The round's announcement and the digest of it that begins the SecAgg+ round context
    /// ([`cohort_protocols::round_context`]; the set-up completes it), both from one version
    /// of the manifest: the digest covers the manifest the start relays (all zeros without
    /// one, which agents holding a manifest refuse), so a manifest published between the two
    /// cannot make them disagree.
    pub(super) fn round_start(
        &self,
        round: u64,
        attempt: u32,
        task: Task,
        model: Option<&[u8]>,
    ) -> (RoundStart, [u8; 32]) {
        let hash = model.map(model::sha3_512);
        let manifest = self.manifest.as_ref().map(|m| m.get());
        let start = RoundStart {
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
            manifest: manifest
                .as_ref()
                .map(|m| m.bytes.clone())
                .unwrap_or_default(),
        };
        let announced = Announcement {
            round,
            attempt,
            task: start.task,
            secure: start.secure,
            model_sha3_512: &start.model_sha3_512,
            training_toml: &start.training_toml,
            feature_mean: &start.feature_mean,
            feature_std: &start.feature_std,
        }
        .digest(&manifest.map_or([0; 32], |m| m.digest));
        (start, announced)
    }
}
