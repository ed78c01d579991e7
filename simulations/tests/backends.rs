//! A site that trains on burn's wgpu backend takes part in a secure federation and the run
//! gives the result of an all-CPU run, within floating-point tolerance. In CI the wgpu
//! device is lavapipe, Mesa's software Vulkan (`.ci/run` installs it): the wgpu path is built
//! and exercised on a machine without a GPU. This crate's tests build the agent with its
//! `wgpu` feature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use cohort_sim::run::{Summary, run_file_with};
use cohort_testkit::heart::{SITES, csv};
use cohort_testkit::repo;

/// The heart-disease example over `rounds` rounds, secure, with `gpu` training on wgpu.
fn run(dir: &Path, rounds: u64, gpu: &[&str]) -> Summary {
    let mut text = std::fs::read_to_string(repo().join("examples/heart-disease.toml")).unwrap();
    assert!(text.contains("rounds = 15") && text.contains("secure = true"));
    text = text.replace("rounds = 15", &format!("rounds = {rounds}"));
    for site in SITES {
        let shipped = format!("csv = \"../data/heart-disease/{site}.csv\"");
        assert!(text.contains(&shipped), "the example names {site}'s CSV");
        let csv = csv(site);
        let device = if gpu.contains(&site) {
            "\ndevice = \"gpu\""
        } else {
            ""
        };
        text = text.replace(&shipped, &format!("csv = {csv:?}{device}"));
    }
    let name = if gpu.is_empty() { "cpu" } else { "gpu" };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    run_file_with(&path, &dir.join(name), false).expect("the scenario runs")
}

#[test]
fn a_site_training_on_wgpu_takes_part_in_a_secure_federation_with_the_cpu_result() {
    if !cohort_testkit::gpu::wgpu_device() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu = run(dir.path(), 4, &[]);
    let gpu = run(dir.path(), 4, &["cleveland"]);
    assert!(cpu.secure && gpu.secure);
    assert_eq!(gpu.rounds_completed, 4);
    assert_eq!(gpu.coordinator_received.plain_updates, 0);
    for (c, g) in cpu.rounds.iter().zip(&gpu.rounds) {
        assert_eq!(g.sites, 4, "round {}: every site took part", g.round);
        assert!(
            (c.loss - g.loss).abs() < 1e-3,
            "round {}: loss {} on CPU, {} with a wgpu site",
            c.round,
            c.loss,
            g.loss
        );
    }
    for site in SITES {
        let (c, g) = (&cpu.per_site[site], &gpu.per_site[site]);
        let (c, g) = (c.accuracy.unwrap(), g.accuracy.unwrap());
        // One test row of the smallest site is 1/11 of its accuracy: the runs agree unless a
        // row sits on the decision boundary within rounding.
        assert!(
            (c - g).abs() < 0.1,
            "{site}: accuracy {c} on CPU, {g} with a wgpu site"
        );
    }
}
