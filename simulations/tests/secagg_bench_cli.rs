//! The `secagg-bench` command's contract: its JSON keys, its exactness check and its errors.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cohort-sim"))
        .arg("secagg-bench")
        .args(args)
        .output()
        .expect("cohort-sim runs")
}

#[test]
fn json_report_has_the_contract_keys_and_is_exact() {
    let out = bench(&[
        "--sites",
        "12",
        "--dim",
        "300",
        "--dropout",
        "0.25",
        "--seed",
        "7",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["sites"], 12);
    assert_eq!(v["dim"], 300);
    assert_eq!(v["neighbours"], 9); // 2 * ceil(log2 12) + 1
    assert_eq!(v["threshold"], 6); // ceil(9 / 2) + 1
    assert_eq!(v["dropped"], 3); // floor(0.25 * 12)
    assert_eq!(v["exact"], true);
    for key in ["total", "client_mask_mean", "server_unmask"] {
        assert!(v["seconds"][key].as_f64().expect(key) > 0.0, "{key}");
    }
    // 32-bit modulus: the masked vector alone is (300 + 2) * 4 bytes
    assert!(v["bytes_up_per_site"].as_u64().expect("bytes") > 302 * 4);
}

#[test]
fn consistency_check_and_64_bit_modulus_are_exact_too() {
    let out = bench(&[
        "--sites",
        "9",
        "--dim",
        "50",
        "--dropout",
        "0.2",
        "--modulus",
        "64",
        "--consistency-check",
        "--neighbours",
        "9",
        "--threshold",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["exact"], true);
    assert_eq!(v["modulus"], 64);
    assert_eq!(v["dropped"], 1);
}

#[test]
fn table_output_without_json() {
    let out = bench(&["--sites", "5", "--dim", "10"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exact") && text.contains("true"), "{text}");
}

#[test]
fn bad_parameters_fail_with_a_message_that_names_them() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--sites", "10", "--dim", "10", "--threshold", "3"],
            "threshold = 3",
        ),
        (
            &["--sites", "10", "--dim", "10", "--neighbours", "4"],
            "neighbours = 4",
        ),
        (
            &["--sites", "10", "--dim", "10", "--dropout", "1.5"],
            "--dropout 1.5",
        ),
        (
            &["--sites", "10", "--dim", "10", "--modulus", "48"],
            "--modulus 48",
        ),
    ];
    for (args, needle) in cases {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
