//! A site's CSV, parsed and encoded with the heart-disease schema exactly as the agent loads
//! it: an error names file, line and value, never a panic; every encoded row has the model's
//! width and a 0/1 label.

#![no_main]

use cohort_protocols::model::DataSchema;
use cohort_protocols::model::csv;
use libfuzzer_sys::fuzz_target;

const SCHEMA: &str = r#"
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((header, rows)) = csv::parse("fuzz.csv", text) else {
        return;
    };
    let Ok(schema) = toml::from_str::<DataSchema>(SCHEMA) else {
        panic!("the schema is valid");
    };
    let Ok(resolved) = schema.resolve(&header) else {
        return;
    };
    for (i, row) in rows.iter().enumerate() {
        if let Ok(Some(e)) = resolved.encode(i + 2, row, header.len()) {
            assert_eq!(e.features.len(), resolved.width());
            assert!(e.label == 0.0 || e.label == 1.0);
        }
    }
});
