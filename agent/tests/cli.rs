//! The `cohort-agent` binary's exit codes and messages for what a person gets wrong.
//! (Building this test also builds the binary, which the coordinator's multi-process tests
//! start as a separate process.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

fn agent(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_configuration_is_exit_2_naming_the_file() {
    let (code, err) = agent(&["run", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

#[test]
fn predict_refuses_a_file_that_is_not_a_cohort_model() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("x.csv");
    std::fs::write(&csv, "a,num\n1,0\n").unwrap();
    // Missing file.
    let missing = dir.path().join("missing.safetensors");
    let (code, err) = agent(&[
        "predict",
        "--model",
        missing.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.safetensors"), "{err}");
    // A valid safetensors file without Cohort's metadata.
    let data = vec![0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    let bytes = safetensors::tensor::serialize(vec![("0.weight", view)], None).unwrap();
    let foreign = dir.path().join("foreign.safetensors");
    std::fs::write(&foreign, bytes).unwrap();
    let (code, err) = agent(&[
        "predict",
        "--model",
        foreign.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not a model exported by Cohort") && err.contains("cohort.model_spec"),
        "{err}"
    );
}
