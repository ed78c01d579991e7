//! `cohort-sim secagg-bench`: one SecAgg+ round, N client state machines and the server in one
//! process, no network. The output format is a contract used to compare Cohort with other
//! systems: keep its keys stable.
//!
//! Clients run in parallel on rayon's pool (as sites would on their own machines); the server
//! consumes their messages on the calling thread, adding masked inputs into its accumulator as
//! they arrive, so at most a small batch of masked vectors is alive at once.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use cohort_protocols::secagg::{
    Client, ClientId, ClientMessage, Modulus, Params, PinnedIdentities, Poll, QuantisedInput,
    RoundId, Server, ServerMessage, SiteIdentity, StageTimeouts, Word, pinned_roster,
};
use ed25519_dalek::SigningKey;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of sites in the round.
    #[arg(long)]
    sites: u32,
    /// Model dimension d (the masked vector has d + 2 elements).
    #[arg(long)]
    dim: u32,
    /// Neighbourhood size k, the site itself included [default: 2⌈log2 N⌉ + 1, capped at N].
    #[arg(long)]
    neighbours: Option<u32>,
    /// Shares needed to reconstruct a secret [default: ⌈K/2⌉ + 1, capped at K - 1].
    #[arg(long)]
    threshold: Option<u32>,
    /// Fraction of sites that vanish after the share-keys stage (⌊F·N⌋ sites).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Seed for keys, inputs and the choice of dropouts (runs are reproducible).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bits per quantised value; inputs are uniform in [0, 2^q).
    #[arg(long, default_value_t = 16)]
    quant_bits: u32,
    /// Modulus of the masked arithmetic: 32 or 64 (bits).
    #[arg(long, default_value_t = 32)]
    modulus: u32,
    /// Run the consistency-check stage (clients sign the survivor set).
    #[arg(long)]
    consistency_check: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Seconds {
    total: f64,
    client_mask_mean: f64,
    server_unmask: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    sites: u32,
    dim: u32,
    neighbours: u32,
    threshold: u32,
    dropped: usize,
    exact: bool,
    seconds: Seconds,
    bytes_up_per_site: u64,
    modulus: u32,
    consistency_check: bool,
    peak_rss_mib: Option<f64>,
    /// Wall time of each stage, clients and server together (extra keys: not part of the
    /// comparison contract).
    stage_seconds: StageSeconds,
}

#[derive(Debug, Default, Serialize)]
struct StageSeconds {
    advertise_keys: f64,
    share_keys: f64,
    masked_input: f64,
    /// Consistency check (if on) and unmasking.
    unmask: f64,
}

pub fn main(args: &BenchArgs) -> Result<ExitCode> {
    if !(0.0..1.0).contains(&args.dropout) {
        bail!(
            "--dropout {} is out of range: use a fraction in [0, 1)",
            args.dropout
        );
    }
    let modulus = Modulus::from_bits(args.modulus)
        .ok_or_else(|| anyhow!("--modulus {} is not supported: use 32 or 64", args.modulus))?;
    let defaults = Params::with_defaults(args.sites, args.dim);
    let neighbours = args.neighbours.unwrap_or(defaults.neighbours);
    let params = Params {
        neighbours,
        threshold: args
            .threshold
            .unwrap_or_else(|| Params::default_threshold(neighbours)),
        quant_bits: args.quant_bits,
        modulus,
        consistency_check: args.consistency_check,
        ..defaults
    };
    params
        .validate()
        .context("invalid secure-aggregation parameters")?;
    let report = match modulus {
        Modulus::Bits32 => run::<u32>(&params, args)?,
        Modulus::Bits64 => run::<u64>(&params, args)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    if report.exact {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the unmasked sum differs from the plaintext sum");
        Ok(ExitCode::from(3))
    }
}

/// splitmix64: fast, good enough for benchmark inputs (not for anything secret).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed_bytes(seed: u64, a: u64, b: u64) -> [u8; 32] {
    let mut s = seed ^ a.rotate_left(17) ^ b.rotate_left(41);
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    out
}

fn run<W: Word>(params: &Params, args: &BenchArgs) -> Result<Report> {
    let n = params.sites;
    let ids: Vec<ClientId> = (0..n).collect();
    let keys: Vec<SigningKey> = ids
        .iter()
        .map(|&id| SigningKey::from_bytes(&seed_bytes(args.seed, 1, id as u64)))
        .collect();
    let verifier = Arc::new(PinnedIdentities::new(
        ids.iter()
            .zip(&keys)
            .map(|(&id, k)| (id, k.verifying_key())),
    ));
    let q_mask = (1u64 << params.quant_bits) - 1;
    let inputs: Vec<Vec<W>> = ids
        .par_iter()
        .map(|&id| {
            let mut s = args.seed ^ (id as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            (0..params.vector_len())
                .map(|_| W::from_u64_wrapping(splitmix(&mut s) & q_mask))
                .collect()
        })
        .collect();
    let dropped: Vec<ClientId> = {
        let count = (args.dropout * n as f64).floor() as usize;
        let mut order = ids.clone();
        let mut s = args.seed ^ 0xd509;
        for i in (1..order.len()).rev() {
            order.swap(i, (splitmix(&mut s) % (i as u64 + 1)) as usize);
        }
        let mut d = order[..count].to_vec();
        d.sort_unstable();
        d
    };
    let is_dropped = |id: ClientId| dropped.binary_search(&id).is_ok();
    let round = RoundId::new(args.seed, 0);
    let mut bytes_up = vec![0u64; n as usize];
    let now = 0;

    let start = Instant::now();
    let mut clients: Vec<Client<W>> = ids
        .iter()
        .zip(keys)
        .map(|(&id, key)| {
            Client::new(
                SiteIdentity::pinned(id, key),
                verifier.clone(),
                round,
                seed_bytes(args.seed, 2, id as u64),
            )
        })
        .collect();
    let (mut server, setup) = Server::<W>::new(
        params.clone(),
        round,
        &pinned_roster(&ids),
        seed_bytes(args.seed, 3, 0),
        verifier.clone(),
        StageTimeouts::default(),
        now,
    )
    .map_err(|e| anyhow!("{e}"))?;

    // Stages 1 and 2: advertise keys, share keys.
    let mut inbox: Vec<Option<ServerMessage>> = vec![Some(ServerMessage::Setup(setup)); n as usize];
    let mut stage_seconds = StageSeconds::default();
    for stage in [
        &mut stage_seconds.advertise_keys,
        &mut stage_seconds.share_keys,
    ] {
        let t0 = Instant::now();
        let replies = respond(&mut clients, &mut inbox)?;
        deliver(&mut server, replies, &mut bytes_up)?;
        inbox = route(server.poll(now).map_err(|e| anyhow!("{e}"))?, n)?;
        *stage = t0.elapsed().as_secs_f64();
    }
    let masked_start = Instant::now();

    // Stage 3: masked input, from the sites that did not drop. Batches bound memory to a few
    // masked vectors while the server accumulates.
    let mut mask_time = Duration::ZERO;
    let batch = 4 * rayon::current_num_threads().max(1);
    let survivors: Vec<usize> = (0..n as usize).filter(|&i| !is_dropped(i as u32)).collect();
    for chunk in survivors.chunks(batch) {
        let lo = chunk[0];
        let hi = chunk[chunk.len() - 1] + 1;
        let results: Vec<(ClientId, ClientMessage<W>, Duration)> = clients[lo..hi]
            .par_iter_mut()
            .zip(inbox[lo..hi].par_iter_mut())
            .zip(inputs[lo..hi].par_iter())
            .filter(|((c, _), _)| !is_dropped(c.id()))
            .map(|((client, msg), input)| {
                let msg = msg
                    .take()
                    .ok_or_else(|| anyhow!("site {} got no shares", client.id()))?;
                let t0 = Instant::now();
                let reply = match client.handle(&msg)? {
                    Some(r) => Some(r),
                    None => client.set_input(QuantisedInput::from_values(input.clone()))?,
                };
                let elapsed = t0.elapsed();
                let reply = reply.ok_or_else(|| anyhow!("site {} sent no input", client.id()))?;
                Ok((client.id(), reply, elapsed))
            })
            .collect::<Result<_>>()?;
        for (id, msg, elapsed) in results {
            mask_time += elapsed;
            bytes_up[id as usize] += msg.encoded_len() as u64;
            server.receive(id, msg, now).map_err(|e| anyhow!("{e}"))?;
        }
    }
    // The dropped sites stay silent; the deadline passes.
    let mut poll = server.poll(now).map_err(|e| anyhow!("{e}"))?;
    if let Poll::Pending { deadline } = poll {
        poll = server.poll(deadline).map_err(|e| anyhow!("{e}"))?;
    }
    inbox = route(poll, n)?;

    // Optional consistency check, then unmask.
    // server_unmask: from the first revealed share reaching the server to the unmasked sum.
    stage_seconds.masked_input = masked_start.elapsed().as_secs_f64();
    let unmask_stage_start = Instant::now();
    let (output, server_unmask) = loop {
        let replies = respond(&mut clients, &mut inbox)?;
        let unmask_start = Instant::now();
        deliver(&mut server, replies, &mut bytes_up)?;
        match server.poll(now).map_err(|e| anyhow!("{e}"))? {
            Poll::Done(out) => break (out, unmask_start.elapsed()),
            other => inbox = route(other, n)?,
        }
    };
    let total = start.elapsed();
    stage_seconds.unmask = unmask_stage_start.elapsed().as_secs_f64();

    // Independent check: plain wrapping sum of the survivors' inputs.
    let modulus_mask = if W::BITS == 64 {
        u64::MAX
    } else {
        (1u64 << W::BITS) - 1
    };
    let mut plain = vec![0u64; params.vector_len()];
    for &i in &survivors {
        for (p, x) in plain.iter_mut().zip(&inputs[i]) {
            *p = p.wrapping_add(x.to_u64()) & modulus_mask;
        }
    }
    let expected_survivors: Vec<ClientId> = survivors.iter().map(|&i| i as ClientId).collect();
    let exact = output.survivors == expected_survivors
        && output.sum.len() == plain.len()
        && output.sum.iter().zip(&plain).all(|(a, b)| a.to_u64() == *b);

    Ok(Report {
        sites: n,
        dim: params.dim,
        neighbours: params.neighbours,
        threshold: params.threshold,
        dropped: dropped.len(),
        exact,
        seconds: Seconds {
            total: total.as_secs_f64(),
            client_mask_mean: mask_time.as_secs_f64() / survivors.len().max(1) as f64,
            server_unmask: server_unmask.as_secs_f64(),
        },
        bytes_up_per_site: survivors.iter().map(|&i| bytes_up[i]).sum::<u64>()
            / survivors.len().max(1) as u64,
        modulus: W::BITS,
        consistency_check: params.consistency_check,
        peak_rss_mib: peak_rss_mib(),
        stage_seconds,
    })
}

/// Every client with a message answers it, in parallel.
fn respond<W: Word>(
    clients: &mut [Client<W>],
    inbox: &mut [Option<ServerMessage>],
) -> Result<Vec<(ClientId, ClientMessage<W>)>> {
    clients
        .par_iter_mut()
        .zip(inbox.par_iter_mut())
        .filter_map(|(c, m)| m.take().map(|m| (c, m)))
        .map(|(client, msg)| {
            let reply = client
                .handle(&msg)
                .with_context(|| format!("site {}", client.id()))?;
            Ok(reply.map(|r| (client.id(), r)))
        })
        .filter_map(Result::transpose)
        .collect()
}

fn deliver<W: Word>(
    server: &mut Server<W>,
    replies: Vec<(ClientId, ClientMessage<W>)>,
    bytes_up: &mut [u64],
) -> Result<()> {
    for (id, msg) in replies {
        bytes_up[id as usize] += msg.encoded_len() as u64;
        server.receive(id, msg, 0).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

fn route<W: Word>(poll: Poll<W>, n: u32) -> Result<Vec<Option<ServerMessage>>> {
    let Poll::Send(messages) = poll else {
        bail!("the server did not close the stage: {poll:?}");
    };
    let mut inbox = vec![None; n as usize];
    for (to, m) in messages {
        *inbox
            .get_mut(to as usize)
            .ok_or_else(|| anyhow!("message for unknown site {to}"))? = Some(m);
    }
    Ok(inbox)
}

/// Peak resident set size of this process (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn print_table(r: &Report) {
    println!("SecAgg+ round (in memory, no network)");
    println!("  sites                {:>12}", r.sites);
    println!("  dim                  {:>12}", r.dim);
    println!("  neighbours (k)       {:>12}", r.neighbours);
    println!("  threshold (t)        {:>12}", r.threshold);
    println!("  modulus              {:>12}", format!("2^{}", r.modulus));
    println!("  consistency check    {:>12}", r.consistency_check);
    println!("  dropped              {:>12}", r.dropped);
    println!("  exact                {:>12}", r.exact);
    println!("  total                {:>10.4} s", r.seconds.total);
    println!(
        "  client mask (mean)   {:>10.4} s",
        r.seconds.client_mask_mean
    );
    println!("  server unmask        {:>10.4} s", r.seconds.server_unmask);
    println!("  bytes up per site    {:>12}", r.bytes_up_per_site);
    let st = &r.stage_seconds;
    println!("  stages (wall)");
    println!("    advertise keys     {:>10.4} s", st.advertise_keys);
    println!("    share keys         {:>10.4} s", st.share_keys);
    println!("    masked input       {:>10.4} s", st.masked_input);
    println!("    (check +) unmask   {:>10.4} s", st.unmask);
    if let Some(m) = r.peak_rss_mib {
        println!("  peak RSS             {:>8.1} MiB", m);
    }
}
