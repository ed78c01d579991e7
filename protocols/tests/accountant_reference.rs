//! Cohort's privacy accountant against an independent implementation: Google's
//! `dp-accounting` (PyPI; `.ci/run` installs it), on a grid of noise multipliers, sampling
//! rates and step counts that covers DP-SGD at a hospital (small rates, many steps) and a
//! site-level release per round (rate 1). Every ε must agree within 1%.
//!
//! Outside CI a machine without Python's `dp_accounting` skips the comparison with a message;
//! in CI it is required.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use cohort_protocols::privacy::{Accountant, Mechanism};

const SIGMAS: [f64; 6] = [0.5, 0.8, 1.0, 1.5, 3.0, 10.0];
const RATES: [f64; 5] = [0.001, 0.01, 0.05, 0.25, 1.0];
const STEPS: [u64; 5] = [1, 10, 100, 1_000, 10_000];
const DELTAS: [f64; 2] = [1e-5, 1e-3];

/// The reference ε for every (σ, q, steps, δ) of the grid, in the grid's order.
const REFERENCE: &str = r#"
import sys
import dp_accounting as dp
sigmas, rates, steps, deltas = (eval(a) for a in sys.argv[1:5])
for s in sigmas:
    for q in rates:
        for n in steps:
            acc = dp.rdp.RdpAccountant()
            event = dp.GaussianDpEvent(s) if q == 1.0 else dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(s))
            acc.compose(event, n)
            for d in deltas:
                print(float(acc.get_epsilon(d)))
"#;

fn reference() -> Option<Vec<f64>> {
    let list = |v: &[String]| format!("[{}]", v.join(","));
    let out = Command::new("python3")
        .args(["-c", REFERENCE])
        .arg(list(&SIGMAS.map(|x| format!("{x:?}"))))
        .arg(list(&RATES.map(|x| format!("{x:?}"))))
        .arg(list(&STEPS.map(|x| x.to_string())))
        .arg(list(&DELTAS.map(|x| format!("{x:?}"))))
        .output();
    let in_ci = std::env::var_os("CI").is_some();
    match out {
        Ok(o) if o.status.success() => Some(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| {
                    l.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("dp_accounting said {l:?}: {e}"))
                })
                .collect(),
        ),
        Ok(o) if !in_ci && String::from_utf8_lossy(&o.stderr).contains("ModuleNotFoundError") => {
            eprintln!("Python's dp_accounting is missing: the comparison is skipped");
            None
        }
        Ok(o) => panic!(
            "dp_accounting failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if !in_ci => {
            eprintln!("python3 not found ({e}): the comparison is skipped");
            None
        }
        Err(e) => panic!("python3 is required in CI: {e}"),
    }
}

#[test]
fn epsilon_agrees_with_google_dp_accounting_within_one_percent() {
    let Some(theirs) = reference() else {
        return;
    };
    let mut i = 0;
    let mut worst: f64 = 0.0;
    for sigma in SIGMAS {
        for q in RATES {
            for steps in STEPS {
                let mut acc = Accountant::new();
                acc.compose(
                    Mechanism::SubsampledGaussian {
                        sampling_rate: q,
                        noise_multiplier: sigma,
                    },
                    steps,
                )
                .unwrap();
                for delta in DELTAS {
                    let ours = acc.epsilon(delta).unwrap().epsilon;
                    let want = theirs[i];
                    i += 1;
                    let what = format!("σ {sigma}, q {q}, {steps} steps, δ {delta}");
                    if !want.is_finite() || want < 1e-9 {
                        assert_eq!(
                            ours.is_finite(),
                            want.is_finite(),
                            "{what}: {ours} vs {want}"
                        );
                        continue;
                    }
                    let rel = (ours - want).abs() / want;
                    worst = worst.max(rel);
                    assert!(rel < 0.01, "{what}: ε {ours} vs dp-accounting {want}");
                }
            }
        }
    }
    assert_eq!(i, theirs.len(), "one reference value per grid point");
    eprintln!("{i} grid points, largest relative difference {worst:.2e}");
}
