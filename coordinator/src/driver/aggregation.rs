//! Aggregation: a SecAgg+ round driven over the hub, and the plain sum of comparison runs.
//! Updates stream into their slots from the sites' connection tasks; this side moves the
//! control messages and closes stages.

use super::*;

/// Removes the sites' upload slots when an aggregation ends, however it ends, so no chunk
/// arriving later is fed to a closed sum and the sum's memory is freed.
struct OpenUploads {
    hub: Arc<Hub>,
    round: u64,
    sites: Vec<String>,
}

impl OpenUploads {
    fn new(hub: &Arc<Hub>, round: u64, sites: &[(String, u32)]) -> Self {
        OpenUploads {
            hub: hub.clone(),
            round,
            sites: sites.iter().map(|(s, _)| s.clone()).collect(),
        }
    }

    fn open(&self, site: &str, sink: UploadSink) {
        let round = self.round;
        self.hub
            .uploads
            .insert(site.to_string(), OpenUpload { round, sink });
    }
}

impl Drop for OpenUploads {
    fn drop(&mut self) {
        for s in &self.sites {
            self.hub.uploads.remove(s);
        }
    }
}

/// A plain aggregation whose slots are open. Opened before the round starts, because a site
/// answers a statistics round at once.
pub(super) struct PlainAggregation {
    round: u64,
    sum: Arc<PlainSum>,
    slots: Vec<(String, Arc<PlainSlot>)>,
    _uploads: OpenUploads,
}

impl PlainAggregation {
    pub(super) fn open(
        hub: &Arc<Hub>,
        round: u64,
        sites: &[(String, u32)],
        len: usize,
        integer: bool,
        max_weight: u64,
        keep: bool,
    ) -> Self {
        let sum = Arc::new(PlainSum::new(len, integer));
        let uploads = OpenUploads::new(hub, round, sites);
        let slots = sites
            .iter()
            .map(|(site, _)| {
                let slot = Arc::new(if keep {
                    PlainSlot::keeping(sum.clone(), max_weight as f64)
                } else {
                    PlainSlot::capped(sum.clone(), max_weight as f64)
                });
                uploads.open(site, UploadSink::Plain(slot.clone()));
                (site.clone(), slot)
            })
            .collect();
        PlainAggregation {
            round,
            sum,
            slots,
            _uploads: uploads,
        }
    }
}

/// Collects chunks of SecAgg+ control messages (keys, shares) into whole messages, per site,
/// with a size limit.
struct Reassembler {
    buffers: HashMap<String, Vec<u8>>,
    limit: usize,
}

impl Reassembler {
    fn new(limit: usize) -> Self {
        Reassembler {
            buffers: HashMap::new(),
            limit,
        }
    }

    /// Some(bytes) when `chunk` completes a message; Err when the site exceeds the limit.
    fn push(&mut self, site: &str, chunk: Chunk) -> Result<Option<Vec<u8>>, usize> {
        let buf = self.buffers.entry(site.to_string()).or_default();
        if buf.len() + chunk.data.len() > self.limit {
            let len = buf.len() + chunk.data.len();
            self.buffers.remove(site);
            return Err(len);
        }
        buf.extend_from_slice(&chunk.data);
        Ok(if chunk.last {
            self.buffers.remove(site)
        } else {
            None
        })
    }
}

impl Driver {
    /// Logs and counts each refused message's sender (`rejections`, `last_rejection` in the
    /// status API); returns the senders.
    fn record_rejections(
        &mut self,
        round: u64,
        by_id: &HashMap<u32, String>,
        rejections: &[cohort_protocols::secagg::Rejection],
    ) -> Vec<String> {
        let mut sites = Vec::new();
        for r in rejections {
            let Some(site) = by_id.get(&r.client) else {
                continue;
            };
            warn!(round, %site, stage = ?r.stage, reason = %r.reason, "site's message refused: excluded from the round");
            self.hub.record(site, |s| {
                s.rejections += 1;
                s.last_rejection = Some((round, format!("{:?}: {}", r.stage, r.reason)));
            });
            sites.push(site.clone());
        }
        self.rejected.extend(sites.iter().cloned());
        sites
    }

    /// `accuser` could not decrypt shares that `accused` signed. The coordinator cannot check
    /// which of the two lies (only they hold the pairwise key), so both are left out of the
    /// round's next attempts: a site that sends garbage loses its place, and a site that
    /// accuses falsely loses its own too, so it cannot push out honest sites for free. The
    /// report is counted on the accused's record, worded as a report; the round's `rejected`
    /// list keeps to what the coordinator verified itself.
    fn accusation(&mut self, round: u64, accuser: &str, accused: &str) {
        warn!(round, %accuser, %accused, "site reports undecryptable shares signed by another: both left out of the round's next attempts");
        self.hub.record(accused, |s| {
            s.rejections += 1;
            s.last_rejection = Some((
                round,
                format!(
                    "ShareKeys: reported by {accuser}: shares signed by this site do not decrypt (unverifiable by the coordinator; both sites left out of the round's later attempts)"
                ),
            ));
        });
        self.sidelined.insert(accused.to_string());
        self.sidelined.insert(accuser.to_string());
    }

    /// `accuser` accused a site that sent it no share in this attempt (or no participant at
    /// all): there is nothing it could have failed to decrypt, so the accusation is refused
    /// and counted against the accuser — a verified refusal, in the round's `rejected` — and
    /// the accused is left alone. Without this, any site could push any other out of a
    /// round's later attempts at the price of its own place.
    fn baseless_accusation(&mut self, round: u64, accuser: &str, accused: String) {
        warn!(round, %accuser, %accused, "site accused another that sent it no share in this attempt: refused, counted against the accuser");
        self.hub.record(accuser, |s| {
            s.rejections += 1;
            s.last_rejection = Some((
                round,
                format!(
                    "accused {accused} of undecryptable shares without evidence: {accused} sent it no share in this attempt"
                ),
            ));
        });
        self.rejected.insert(accuser.to_string());
        self.sidelined.insert(accuser.to_string());
    }

    /// Adds the time of `stage` (the stage and when it opened), ended now, to the current
    /// attempt's log; returns its name and seconds.
    fn log_stage(&mut self, stage: &(ServerStage, Instant)) -> (String, f64) {
        let (name, seconds) = (format!("{:?}", stage.0), stage.1.elapsed().as_secs_f64());
        if let Some(log) = self.attempt_log.last_mut() {
            log.stages.push(crate::records::StageTime {
                stage: name.clone(),
                seconds,
            });
        }
        (name, seconds)
    }

    /// Records the end of SecAgg+ stage `stage.0` (its duration) and the start of `now`.
    fn stage_changed(
        &mut self,
        state: RunState,
        round: RoundId,
        stage: &mut (ServerStage, Instant),
        now: ServerStage,
    ) {
        let (name, seconds) = self.log_stage(stage);
        self.metrics.stage(&name, seconds);
        let open = !matches!(now, ServerStage::Done | ServerStage::Aborted);
        self.progress.set_stage(
            state,
            round.round,
            round.attempt,
            open.then(|| format!("{now:?}")),
        );
        *stage = (now, Instant::now());
    }

    /// Runs one SecAgg+ aggregation among `sites`.
    pub(super) async fn secagg<W: SinkWord>(
        &mut self,
        round: RoundId,
        sites: &[(String, u32)],
        params: Params,
    ) -> Result<Aggregated<Ranges<W>>, String> {
        let clock = Instant::now();
        let by_id: HashMap<u32, String> = sites.iter().map(|(s, id)| (*id, s.clone())).collect();
        let by_name: HashMap<String, u32> = sites.iter().map(|(s, id)| (s.clone(), *id)).collect();
        let roster: Vec<(u32, String)> = sites.iter().map(|(s, id)| (*id, s.clone())).collect();
        let stage = self.cfg.rounds.stage_timeout_secs * 1000;
        let timeouts = StageTimeouts {
            advertise_keys: stage,
            share_keys: stage,
            masked_input: self.cfg.rounds.train_timeout_secs * 1000,
            consistency_check: stage,
            unmask: stage,
        };
        let mut verifier = CaVerifier::new(self.ca_der.clone(), unix_seconds() as i64)
            .map_err(|e| e.to_string())?;
        if let Some(m) = &self.manifest {
            verifier = verifier.with_manifest(&m.get().signed);
        }
        // The version this round runs under: a site declining because it pins another one
        // says which (see `wait_for_manifest`).
        let round_manifest = self.manifest.as_ref().map(|m| m.get().signed.version());
        // `round.context` holds the announcement's digest; the round's context adds the whole
        // set-up (parameters, seed, roster), as every site computes it from its own Setup.
        let seed = random_seed();
        let probe = cohort_protocols::secagg::Setup::new(round, params.clone(), seed, &roster);
        let round = round.with_context(round_context(&round.context, &probe));
        let (mut server, setup) = Server::<W>::new(
            params.clone(),
            round,
            &roster,
            seed,
            Arc::new(verifier),
            timeouts,
            now_ms(clock),
        )
        .map_err(|e| e.to_string())?;
        let setup_bytes =
            Bytes::from(cohort_protocols::secagg::ServerMessage::Setup(setup).encode());
        info!(round = round.round, attempt = round.attempt, stage = ?server.stage(), sites = sites.len(), "SecAgg+ stage open");
        let state = if round.round == 0 {
            RunState::Statistics
        } else {
            RunState::Training
        };
        let mut stage = (server.stage(), Instant::now());
        self.progress.set_stage(
            state,
            round.round,
            round.attempt,
            Some(format!("{:?}", stage.0)),
        );
        let batches = sites
            .iter()
            .map(|(site, _)| {
                let setup =
                    Outgoing::Chunked(setup_bytes.clone(), coordinator_message::Kind::Secagg);
                (site.clone(), vec![setup])
            })
            .collect();
        let unreached = self
            .hub
            .deliver(round.round, batches, self.control_deadline())
            .await;
        // Control messages only (masked inputs stream into their slots): an identity, or a
        // share per neighbour, well under 1 MiB + 256 bytes per site.
        let limit = (1 << 20) + 256 * sites.len();
        let mut chunks = Reassembler::new(limit);
        let mut banned: HashSet<String> = HashSet::new();
        let uploads = OpenUploads::new(&self.hub, round.round, sites);
        let sessions = Sessions::of(&self.hub, sites);
        let mut waiting = WaitingLog::new();
        let mut slots_open = false;
        // A site may have gone while the round started (its disconnect went to another wait),
        // or not taken its Setup.
        for site in sessions.gone().into_iter().chain(unreached) {
            if let Some(&id) = by_name.get(&site) {
                server.disconnected(id);
            }
        }
        // The masked-input slots, kept past the stage (the server forgets them when it closes)
        // to see whose input arrived. `return` inside the block below ends the attempt; the
        // block lets the spent sites be collected however it ended.
        let mut opened = Vec::new();
        let result: Result<Aggregated<Ranges<W>>, String> = async {
            loop {
                match server.poll(now_ms(clock)) {
                    Err(abort) => {
                        // The stage that was open when the attempt ended, for its log.
                        self.log_stage(&stage);
                        // Whoever was refused in the failed attempt is counted, and left out of
                        // the round's next attempts: one lying site must not abort them all.
                        let rejected = self.record_rejections(round.round, &by_id, server.rejections());
                        self.sidelined.extend(rejected);
                        if let AbortReason::PartialInput { client } = abort.reason
                            && let Some(site) = by_id.get(&client)
                        {
                            warn!(round = round.round, %site, "site left out of the round's next attempts: its upload stopped part-way");
                            self.sidelined.insert(site.clone());
                        }
                        return Err(abort.to_string());
                    }
                    Ok(Poll::Done(out)) => {
                        self.stage_changed(state, round, &mut stage, ServerStage::Done);
                        let Output {
                            sum,
                            survivors,
                            dropped,
                            rejections,
                            ..
                        } = *out;
                        self.record_rejections(round.round, &by_id, &rejections);
                        for d in &dropped {
                            if let Some(s) = by_id.get(d) {
                                self.hub.record(s, |st| st.dropouts += 1);
                            }
                        }
                        return Ok(Aggregated {
                            sum,
                            survivors: survivors
                                .iter()
                                .filter_map(|id| by_id.get(id).cloned())
                                .collect(),
                            dropped: dropped.len(),
                            updates: Vec::new(),
                        });
                    }
                    Ok(Poll::Send(messages)) => {
                        info!(round = round.round, attempt = round.attempt, stage = ?server.stage(), sites = messages.len(), "SecAgg+ stage open");
                        self.stage_changed(state, round, &mut stage, server.stage());
                        waiting = WaitingLog::new();
                        // Open the slots before the shares go out: a fast site may answer with
                        // its masked input before the last share is sent.
                        if !slots_open && server.stage() == ServerStage::MaskedInput {
                            for (id, slot) in server.input_slots() {
                                if let Some(site) = by_id.get(&id) {
                                    opened.push((site.clone(), slot.clone()));
                                    uploads.open(site, W::sink(slot));
                                }
                            }
                            slots_open = true;
                        }
                        let batches = messages
                            .into_iter()
                            .filter_map(|(id, m)| {
                                let site = by_id.get(&id)?;
                                let bytes = Bytes::from(m.encode());
                                let item = Outgoing::Chunked(bytes, coordinator_message::Kind::Secagg);
                                Some((site.clone(), vec![item]))
                            })
                            .collect();
                        let unreached = self
                            .hub
                            .deliver(round.round, batches, self.control_deadline())
                            .await;
                        for site in unreached {
                            if let Some(&id) = by_name.get(&site) {
                                server.disconnected(id);
                            }
                        }
                    }
                    Ok(Poll::Pending { deadline }) => {
                        let wait = Duration::from_millis(deadline.saturating_sub(now_ms(clock)))
                            .min(waiting.until_next());
                        let msg = match tokio::time::timeout(wait, self.inbox.recv()).await {
                            Err(_) => {
                                waiting.tick(round.round, &format!("{:?}", server.stage()), || {
                                    server
                                        .awaiting()
                                        .iter()
                                        .filter_map(|id| by_id.get(id).cloned())
                                        .collect()
                                });
                                continue;
                            }
                            Ok(None) => return Err("hub closed".into()),
                            Ok(Some(m)) => m,
                        };
                        let (site, msg) = match msg {
                            Inbound::Message { site, msg, .. } => (site, msg),
                            // Inbound::Uploaded only wakes the loop: the next poll sees the slot.
                            Inbound::Uploaded { .. } => continue,
                            Inbound::Disconnected { .. } => {
                                let awaited = server.awaiting();
                                for site in sessions.gone() {
                                    let Some(&id) = by_name.get(&site) else {
                                        continue;
                                    };
                                    if awaited.contains(&id) {
                                        info!(round = round.round, attempt = round.attempt, %site, stage = ?server.stage(), "site disconnected: the stage no longer waits for it");
                                    }
                                    server.disconnected(id);
                                }
                                continue;
                            }
                        };
                        let Some(&id) = by_name.get(&site) else {
                            continue;
                        };
                        if banned.contains(&site) {
                            continue;
                        }
                        match msg.kind {
                            Some(agent_message::Kind::Secagg(chunk)) => match chunks.push(&site, chunk)
                            {
                                Err(len) => {
                                    // No agent sends this: its session ends, and the stage stops
                                    // waiting for it.
                                    let reason = format!(
                                        "a SecAgg+ message of {len} bytes exceeds the limit of {limit}"
                                    );
                                    self.hub.close(&site, round.round, &reason);
                                    server.disconnected(id);
                                    banned.insert(site);
                                }
                                Ok(None) => {}
                                Ok(Some(bytes)) => match ClientMessage::<W>::decode(&bytes) {
                                    Err(e) => {
                                        let reason = format!("undecodable SecAgg+ message: {e}");
                                        self.hub.close(&site, round.round, &reason);
                                        self.rejected.insert(site.clone());
                                        server.disconnected(id);
                                        banned.insert(site);
                                    }
                                    Ok(m) => {
                                        if let Err(r) = server.receive(id, m, now_ms(clock)) {
                                            warn!(round = round.round, %site, reason = %r.reason, "message rejected");
                                        }
                                    }
                                },
                            },
                            Some(agent_message::Kind::Decline(d)) => {
                                warn!(round = round.round, %site, reason = %d.reason, "site declined the round");
                                // Only a version other than the one this round runs under explains
                                // the decline; a site claiming otherwise is not waited for.
                                if let Some(version) = d.trusted_manifest
                                    && Some(version) != round_manifest
                                {
                                    self.manifest_declines.insert(site.clone(), version);
                                }
                                self.hub.record(&site, |s| {
                                    s.last_decline = Some((round.round, d.reason.clone()))
                                });
                                // Its ledger holds an input for this round (sent before a restart,
                                // of either end): no attempt of the round can include it.
                                if d.contributed_round.is_some_and(|r| r >= round.round) {
                                    self.spent.insert(site.clone());
                                }
                                if let Some(accused) = d.accused {
                                    match by_id.get(&accused) {
                                        Some(name) if server.forwarded_share(accused, id) => {
                                            self.accusation(round.round, &site, name);
                                        }
                                        other => self.baseless_accusation(
                                            round.round,
                                            &site,
                                            other.map_or_else(|| format!("id {accused}"), Clone::clone),
                                        ),
                                    }
                                }
                                // It will send nothing more: the stage need not wait for it.
                                server.disconnected(id);
                                banned.insert(site);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        .await;
        // Whoever's input reached the sum (or began to) has contributed to this round, however
        // the attempt ended — except, in a training round, a site that trains with DP-SGD:
        // it pays for each update it sends with its own accountant, so a retry may ask it
        // again (its ledger allows a fresh release, `Ledger::check_release`).
        for (site, slot) in opened {
            if slot.started() && !(round.round > 0 && self.pays_per_update(&site)) {
                self.spent.insert(site);
            }
        }
        result
    }

    /// Plain aggregation for comparison runs. Training rounds: each site sends
    /// [w, Δ...] as f32 and the sum is kept as f64 (w·Δ); stats rounds: u64 wrapping sums.
    /// Updates stream into the sum like masked inputs do.
    pub(super) async fn plain_sum(
        &mut self,
        plain: Option<PlainAggregation>,
        sites: &[(String, u32)],
    ) -> Result<Aggregated<PlainTotals>, String> {
        let Some(PlainAggregation {
            round,
            sum,
            mut slots,
            _uploads: uploads,
        }) = plain
        else {
            return Err("no plain aggregation was opened".into());
        };
        // Only the sites the round start reached are waited for.
        slots.retain(|(site, _)| sites.iter().any(|(s, _)| s == site));
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.cfg.rounds.train_timeout_secs);
        let mut declined: HashSet<String> = HashSet::new();
        let sessions = Sessions::of(&self.hub, sites);
        let mut waiting = WaitingLog::new();
        declined.extend(sessions.gone());
        while !slots
            .iter()
            .all(|(site, slot)| slot.settled() || declined.contains(site))
        {
            let tick = deadline.min(tokio::time::Instant::now() + waiting.until_next());
            match tokio::time::timeout_at(tick, self.inbox.recv()).await {
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {
                    waiting.tick(round, "plain update", || {
                        slots
                            .iter()
                            .filter(|(site, slot)| !slot.settled() && !declined.contains(site))
                            .map(|(site, _)| site.clone())
                            .collect()
                    });
                }
                Ok(None) => return Err("hub closed".into()),
                Ok(Some(Inbound::Disconnected { .. })) => declined.extend(sessions.gone()),
                Ok(Some(Inbound::Message {
                    site,
                    msg:
                        AgentMessage {
                            kind: Some(agent_message::Kind::Decline(d)),
                        },
                    ..
                })) => {
                    warn!(round, %site, reason = %d.reason, "site declined the round");
                    self.hub
                        .record(&site, |s| s.last_decline = Some((round, d.reason.clone())));
                    declined.insert(site);
                }
                Ok(Some(_)) => {}
            }
        }
        drop(uploads);
        let mut done = Vec::new();
        for (site, slot) in &slots {
            match slot.seal() {
                PlainOutcome::Complete => done.push(site.clone()),
                PlainOutcome::Missing => {}
                PlainOutcome::Partial => {
                    warn!(round, %site, "site left out of the round's next attempts: its update stopped part-way");
                    self.sidelined.insert(site.clone());
                    return Err(format!("site {site} stopped part-way through its update"));
                }
            }
        }
        if done.len() < self.cfg.rounds.min_sites as usize {
            return Err(format!(
                "only {} of {} sites sent their update",
                done.len(),
                sites.len()
            ));
        }
        let updates = slots
            .iter()
            .filter(|(site, _)| done.contains(site))
            .filter_map(|(_, slot)| slot.take_update())
            .collect();
        Ok(Aggregated {
            dropped: sites.len() - done.len(),
            survivors: done,
            sum: sum.take(),
            updates,
        })
    }
}
