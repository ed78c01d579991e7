//! `examples/predict.py`: reads an exported model with numpy and safetensors, independently
//! of Cohort, and scores a CSV with it.

use std::path::Path;
use std::process::Command;

/// What `predict.py MODEL CSV` printed.
#[derive(Debug)]
pub struct Prediction {
    /// One line per scored row (`line,probability` for a binary model).
    pub rows: Vec<String>,
    /// Its summary on stderr: the metric's name and value (`accuracy 0.81`, `rmse 3.2`).
    pub metric: String,
    pub value: f64,
}

/// Runs `python3 examples/predict.py model csv`. None when Python or its packages are missing
/// outside CI (`.ci/run` installs them); in CI that is a failure.
pub fn predict(model: &Path, csv: &Path) -> Option<Prediction> {
    let out = Command::new("python3")
        .arg(crate::repo().join("examples/predict.py"))
        .arg(model)
        .arg(csv)
        .output();
    let in_ci = crate::in_ci();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) if !in_ci && String::from_utf8_lossy(&o.stderr).contains("ModuleNotFoundError") => {
            eprintln!("numpy/safetensors for Python are missing: the Python check is skipped");
            return None;
        }
        Ok(o) => panic!(
            "examples/predict.py failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if !in_ci => {
            eprintln!("python3 not found ({e}): the Python check is skipped");
            return None;
        }
        Err(e) => panic!("python3 is required in CI: {e}"),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    let mut words = err.split_whitespace();
    let metric = words.next().unwrap_or_default().to_string();
    let value = words
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric from predict.py: {err}"));
    Some(Prediction {
        rows: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect(),
        metric,
        value,
    })
}
