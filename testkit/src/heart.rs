//! The four hospitals of the UCI heart-disease study (Cleveland, Hungary, Switzerland and
//! the VA Long Beach), as shipped in `data/heart-disease/` with their README and licence.

use std::path::PathBuf;

/// The hospitals, in the order the PKI provisions them (cleveland is site 0).
pub const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

/// The body of the FLamby heart-disease schema: 13 inputs after one-hot coding, the label
/// "any disease" (`num > 0`), the three columns most hospitals lack dropped.
pub const SCHEMA_BODY: &str = r#"label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

/// [`SCHEMA_BODY`] as the `[schema]` table of a configuration file.
pub const SCHEMA: &str = r#"
[schema]
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

/// The same schema with its feature columns listed instead of dropped, so the coordinator
/// derives the 13 inputs itself (and can check a configured `model.inputs`).
pub const LISTED_SCHEMA: &str = r#"
[schema]
label = { column = "num", greater_than = 0 }
features = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

/// The inputs the schema gives (10 columns, `cp` and `restecg` one-hot without a base level).
pub const INPUTS: usize = 13;

/// A hospital's shipped CSV, absolute.
pub fn csv(site: &str) -> PathBuf {
    crate::repo()
        .join("data/heart-disease")
        .join(format!("{site}.csv"))
        .canonicalize()
        .unwrap_or_else(|e| panic!("the shipped data for {site}: {e}"))
}

/// A hospital's CSV split into `dir/<site>-train.csv` and `dir/<site>-test.csv`, every third
/// row a test row: the test rows are then a file of their own, which `cohort-agent predict`
/// and `examples/predict.py` can score as the federation did.
pub fn split(site: &str, dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(csv(site)).unwrap();
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    let (mut train, mut test) = (vec![header], vec![header]);
    for (i, l) in lines.enumerate() {
        if i % 3 == 2 { &mut test } else { &mut train }.push(l);
    }
    let paths = (
        dir.join(format!("{site}-train.csv")),
        dir.join(format!("{site}-test.csv")),
    );
    std::fs::write(&paths.0, train.join("\n") + "\n").unwrap();
    std::fs::write(&paths.1, test.join("\n") + "\n").unwrap();
    paths
}
