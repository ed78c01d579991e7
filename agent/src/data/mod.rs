//! The site's data: a CSV file encoded by the shared schema, split into train and test, and
//! standardised with statistics every site shares.
//!
//! Nothing in this module leaves the site. The only thing derived from the data that is sent
//! anywhere is [`SiteData::stats_vector`], and only through secure aggregation.

use std::borrow::Cow;
use std::path::Path;

use chacha20::ChaCha20Rng;
pub mod images;

use cohort_protocols::model::{DataSchema, SchemaError, Task, stats};
use rand_core::{Rng, SeedableRng};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error(transparent)]
    Csv(#[from] cohort_protocols::model::csv::CsvError),
    #[error("{path}: {error}")]
    Schema { path: String, error: SchemaError },
    #[error("{path}: no usable rows after applying the schema")]
    NoRows { path: String },
    #[error("the two CSV files have different headers")]
    HeaderMismatch,
    #[error("test_fraction = {0}: must be in (0, 1)")]
    BadFraction(f64),
    #[error("{path}: {error}")]
    Image { path: String, error: String },
    #[error(
        "the schema and the data disagree: image data (data.images or data.manifest) needs [schema.images] and a multiclass task, and a schema with [schema.images] needs image data"
    )]
    NotImages,
}

/// Encoded rows: features may be missing (None) until imputation. Labels are training
/// targets (0/1, a class index, or the regression label in its own units).
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub features: Vec<Vec<Option<f64>>>,
    pub labels: Vec<f64>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn push(&mut self, f: Vec<Option<f64>>, y: f64) {
        self.features.push(f);
        self.labels.push(y);
    }

    /// Dense, standardised features (row-major) with missing values replaced by the mean
    /// (0 after standardisation).
    pub fn standardised(&self, mean: &[f64], std: &[f64]) -> Vec<f32> {
        self.features
            .iter()
            .flat_map(|row| {
                row.iter().enumerate().map(|(j, v)| match v {
                    Some(x) => ((x - mean[j]) / std[j]) as f32,
                    None => 0.0,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct SiteData {
    pub inputs: usize,
    /// The schema's task: how labels were encoded, and how the model is trained and judged.
    pub task: Task,
    pub train: Rows,
    pub test: Rows,
    /// Rows dropped for missing values (reported in the agent's log only).
    pub dropped_rows: usize,
}

use cohort_protocols::model::csv::RawRow;

/// Header renames: this site's column name → the schema's.
pub type Renames = std::collections::BTreeMap<String, String>;

/// Reads a CSV with a header (renamed by `renames`); empty cells are missing values.
fn read_csv_renamed(
    path: &Path,
    renames: &Renames,
) -> Result<(Vec<String>, Vec<RawRow>), DataError> {
    let (mut header, rows) = read_csv(path)?;
    for h in &mut header {
        if let Some(to) = renames.get(h) {
            *h = to.clone();
        }
    }
    Ok((header, rows))
}

/// Reads a CSV with a header; empty cells are missing values.
fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<RawRow>), DataError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| DataError::Read {
        path: name.clone(),
        error,
    })?;
    Ok(cohort_protocols::model::csv::parse(&name, &text)?)
}

/// A CSV to score with a model, encoded by `schema`.
#[derive(Debug, Clone)]
pub struct ToScore {
    pub rows: Rows,
    /// The file line of each encoded row (the header is line 1).
    pub lines: Vec<usize>,
    /// Lines dropped for a missing value (schema `missing = "drop_row"`).
    pub dropped: Vec<usize>,
    /// Whether the file has the label column (otherwise `rows.labels` are placeholders).
    pub labelled: bool,
}

/// Reads a CSV to score: rows encoded exactly as in training, with their line numbers. A
/// file without the label column (new cases) is accepted.
pub fn rows_to_score(schema: &DataSchema, path: &Path) -> Result<ToScore, DataError> {
    let name = path.display().to_string();
    let (mut header, mut raw) = read_csv(path)?;
    let label = schema.task.label().to_string();
    let labelled = header.contains(&label);
    if !labelled {
        header.push(label);
        for r in &mut raw {
            r.push(Some(0.0));
        }
    }
    let resolved = schema.resolve(&header).map_err(|error| DataError::Schema {
        path: name.clone(),
        error,
    })?;
    let mut out = ToScore {
        rows: Rows::default(),
        lines: Vec::new(),
        dropped: Vec::new(),
        labelled,
    };
    for (i, r) in raw.iter().enumerate() {
        let line = i + 2;
        match resolved
            .encode(line, r, header.len())
            .map_err(|error| DataError::Schema {
                path: name.clone(),
                error,
            })? {
            Some(e) => {
                out.rows.push(e.features, e.label);
                out.lines.push(line);
            }
            None => out.dropped.push(line),
        }
    }
    Ok(out)
}

fn encode(
    schema: &DataSchema,
    path: &Path,
    renames: &Renames,
) -> Result<(Vec<String>, usize, Rows, usize), DataError> {
    let name = path.display().to_string();
    let (header, raw) = read_csv_renamed(path, renames)?;
    let resolved = schema.resolve(&header).map_err(|error| DataError::Schema {
        path: name.clone(),
        error,
    })?;
    let mut rows = Rows::default();
    let mut dropped = 0;
    for (i, r) in raw.iter().enumerate() {
        match resolved
            .encode(i + 2, r, header.len())
            .map_err(|error| DataError::Schema {
                path: name.clone(),
                error,
            })? {
            Some(e) => rows.push(e.features, e.label),
            None => dropped += 1,
        }
    }
    if rows.is_empty() {
        return Err(DataError::NoRows { path: name });
    }
    Ok((header, resolved.width(), rows, dropped))
}

impl SiteData {
    /// Loads `train_csv`; the test split is `test_csv` if given, otherwise a stratified
    /// `test_fraction` of `train_csv` chosen with `seed`.
    pub fn load(
        schema: &DataSchema,
        train_csv: &Path,
        test_csv: Option<&Path>,
        test_fraction: f64,
        seed: u64,
    ) -> Result<Self, DataError> {
        Self::load_renamed(
            schema,
            &Renames::new(),
            train_csv,
            test_csv,
            test_fraction,
            seed,
        )
    }

    /// An evaluation-only site: every usable row of `csv` is a test row; nothing trains.
    pub fn load_test_only(
        schema: &DataSchema,
        renames: &Renames,
        csv: &Path,
    ) -> Result<Self, DataError> {
        let (_, inputs, test, dropped_rows) = encode(schema, csv, renames)?;
        Ok(SiteData {
            inputs,
            task: schema.task.clone(),
            train: Rows::default(),
            test,
            dropped_rows,
        })
    }

    /// A site whose data are images (`schema.images`): `test` is a separate test source, else a
    /// stratified `test_fraction` of `source` is held out, chosen with `seed`. With
    /// `test_only`, every image is a test row (an evaluation-only site).
    pub fn load_images(
        schema: &DataSchema,
        source: &images::ImageSource,
        test: Option<&images::ImageSource>,
        test_fraction: f64,
        seed: u64,
        test_only: bool,
    ) -> Result<Self, DataError> {
        let inputs = schema.images.map_or(0, |i| i.inputs());
        let all = images::load(schema, source)?;
        let (train, test) = if test_only {
            (Rows::default(), all)
        } else if let Some(t) = test {
            (all, images::load(schema, t)?)
        } else {
            if !(test_fraction > 0.0 && test_fraction < 1.0) {
                return Err(DataError::BadFraction(test_fraction));
            }
            stratified_split(&all, test_fraction, seed, true)
        };
        Ok(SiteData {
            inputs,
            task: schema.task.clone(),
            train,
            test,
            dropped_rows: 0,
        })
    }

    /// [`SiteData::load`] with this site's column names mapped to the schema's first.
    pub fn load_renamed(
        schema: &DataSchema,
        renames: &Renames,
        train_csv: &Path,
        test_csv: Option<&Path>,
        test_fraction: f64,
        seed: u64,
    ) -> Result<Self, DataError> {
        let (header, inputs, all, dropped_rows) = encode(schema, train_csv, renames)?;
        if let Some(test_path) = test_csv {
            let (test_header, _, test, dropped_test) = encode(schema, test_path, renames)?;
            if test_header != header {
                return Err(DataError::HeaderMismatch);
            }
            return Ok(SiteData {
                inputs,
                task: schema.task.clone(),
                train: all,
                test,
                dropped_rows: dropped_rows + dropped_test,
            });
        }
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(DataError::BadFraction(test_fraction));
        }
        let (train, test) = stratified_split(&all, test_fraction, seed, schema.task.classes() > 0);
        Ok(SiteData {
            inputs,
            task: schema.task.clone(),
            train,
            test,
            dropped_rows,
        })
    }

    /// Columns of the federated statistics: the model inputs, then the label when the task
    /// standardises it.
    pub fn stats_columns(&self) -> usize {
        self.inputs + usize::from(self.task.standardises_label())
    }

    /// The training rows as the statistics see them: the features, then the label when the
    /// task standardises it (only then are the rows copied).
    pub fn stats_rows(&self) -> Cow<'_, [Vec<Option<f64>>]> {
        if !self.task.standardises_label() {
            return Cow::Borrowed(&self.train.features);
        }
        Cow::Owned(
            self.train
                .features
                .iter()
                .zip(&self.train.labels)
                .map(|(row, y)| {
                    let mut r = row.clone();
                    r.push(Some(*y));
                    r
                })
                .collect(),
        )
    }

    /// Per statistics column ([`SiteData::stats_columns`]): [non-missing count, Σx, Σx²] over
    /// the training rows, as fixed-point integers in Z/2^64 ready for secure summation
    /// (layout in [`stats`]). Element 0 is the row count.
    pub fn stats_vector(&self) -> Vec<u64> {
        self.stats_vector_of(&self.stats_rows())
    }

    /// [`SiteData::stats_vector`] of rows already from [`SiteData::stats_rows`].
    pub fn stats_vector_of(&self, rows: &[Vec<Option<f64>>]) -> Vec<u64> {
        let mut v = vec![0u64; stats::vector_len(self.stats_columns())];
        v[0] = self.train.len() as u64;
        for row in rows {
            for (j, x) in row.iter().enumerate() {
                if let Some(x) = x {
                    v[1 + 3 * j] += 1;
                    v[2 + 3 * j] = v[2 + 3 * j].wrapping_add(stats::to_fixed(*x));
                    v[3 + 3 * j] = v[3 + 3 * j].wrapping_add(stats::to_fixed(x * x));
                }
            }
        }
        v
    }
}

/// A split that keeps each class's share in both halves (classification), or a plain random
/// split (regression). Classes are taken in ascending order and an absent class draws
/// nothing from the generator, so a binary split is the same as before other tasks existed.
fn stratified_split(all: &Rows, test_fraction: f64, seed: u64, by_class: bool) -> (Rows, Rows) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (mut train, mut test) = (Rows::default(), Rows::default());
    let strata: Vec<Option<f64>> = if by_class {
        let mut c: Vec<f64> = all.labels.clone();
        c.sort_by(f64::total_cmp);
        c.dedup();
        c.into_iter().map(Some).collect()
    } else {
        vec![None]
    };
    for class in strata {
        let mut idx: Vec<usize> = (0..all.len())
            .filter(|&i| class.is_none_or(|c| all.labels[i] == c))
            .collect();
        for i in (1..idx.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
        let n_test = (idx.len() as f64 * test_fraction).round() as usize;
        for (k, &i) in idx.iter().enumerate() {
            let target = if k < n_test { &mut test } else { &mut train };
            target.push(all.features[i].clone(), all.labels[i]);
        }
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> DataSchema {
        toml::from_str(
            r#"
            label = { column = "num", greater_than = 0 }
            drop = ["slope", "ca", "thal"]
            categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
            missing = "drop_row"
            "#,
        )
        .expect("schema")
    }

    fn heart(site: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../data/heart-disease/{site}.csv"))
    }

    #[test]
    fn flamby_row_counts_and_split() {
        for (site, rows, test) in [
            ("cleveland", 303, 104),
            ("hungary", 261, 89),
            ("switzerland", 46, 16),
            ("va", 130, 44),
        ] {
            let d = SiteData::load(&schema(), &heart(site), None, 0.34, 42).expect(site);
            assert_eq!(d.inputs, 13);
            assert_eq!(d.train.len() + d.test.len(), rows, "{site}");
            assert!(
                (d.test.len() as i64 - test).abs() <= 1,
                "{site}: {} test rows",
                d.test.len()
            );
            // stratified: both classes appear in test when both exist
            let pos = d.test.labels.iter().filter(|&&y| y == 1.0).count();
            assert!(pos > 0, "{site}");
        }
    }

    #[test]
    fn stats_sum_gives_mean_and_std() {
        let d = SiteData::load(&schema(), &heart("cleveland"), None, 0.34, 1).expect("load");
        let (mean, std) = stats::from_sum(&d.stats_vector(), d.inputs);
        let ages: Vec<f64> = d
            .train
            .features
            .iter()
            .map(|r| r[0].expect("age"))
            .collect();
        let m = ages.iter().sum::<f64>() / ages.len() as f64;
        let s = (ages.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / ages.len() as f64).sqrt();
        assert!((mean[0] - m).abs() < 1e-3 && (std[0] - s).abs() < 1e-3);
        let x = d.train.standardised(&mean, &std);
        assert_eq!(x.len(), d.train.len() * 13);
    }

    #[test]
    fn impute_mean_keeps_rows_and_fills_the_mean() {
        let mut s = schema();
        s.missing = cohort_protocols::model::MissingValues::ImputeMean;
        let d = SiteData::load(&s, &heart("va"), None, 0.34, 1).expect("load");
        assert_eq!(d.train.len() + d.test.len(), 200, "no row dropped");
        assert_eq!(d.dropped_rows, 0);
        let (mean, std) = stats::from_sum(&d.stats_vector(), d.inputs);
        let x = d.train.standardised(&mean, &std);
        // a missing trestbps (input 5) becomes the mean, i.e. 0 after standardisation
        let row = d
            .train
            .features
            .iter()
            .position(|r| r[5].is_none())
            .expect("VA misses trestbps");
        assert_eq!(x[row * d.inputs + 5], 0.0);
        assert!(x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn renamed_columns_load_as_the_schema_names_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let text = std::fs::read_to_string(heart("cleveland")).expect("csv");
        let renamed = text.replacen("cp,", "chest_pain,", 1);
        let p = dir.path().join("local.csv");
        std::fs::write(&p, &renamed).expect("write");
        let err = SiteData::load(&schema(), &p, None, 0.34, 1).expect_err("cp is missing");
        assert!(err.to_string().contains("\"cp\""), "{err}");
        let renames = Renames::from([("chest_pain".to_string(), "cp".to_string())]);
        let local = SiteData::load_renamed(&schema(), &renames, &p, None, 0.34, 1).expect("load");
        let original = SiteData::load(&schema(), &heart("cleveland"), None, 0.34, 1).expect("load");
        assert_eq!(local.train.features, original.train.features);
        assert_eq!(local.test.labels, original.test.labels);
    }

    #[test]
    fn tasks_encode_their_labels_and_a_standardised_label_joins_the_statistics() {
        let multi: DataSchema = toml::from_str(
            "drop = [\"slope\", \"ca\", \"thal\"]\n[task]\nkind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2, 3, 4]",
        )
        .expect("schema");
        let d = SiteData::load(&multi, &heart("cleveland"), None, 0.34, 42).expect("load");
        // Stratified per class: every one of Cleveland's five classes is in the test split.
        for class in 0..5 {
            assert!(d.test.labels.contains(&(class as f64)), "class {class}");
        }
        assert_eq!(d.stats_columns(), d.inputs);
        let regression: DataSchema = toml::from_str(
            "drop = [\"slope\", \"ca\", \"thal\", \"num\"]\n[task]\nkind = \"regression\"\nlabel = \"thalach\"",
        )
        .expect("schema");
        // VA misses thalach in 53 rows: they are dropped, not an error.
        let va = SiteData::load(&regression, &heart("va"), None, 0.34, 42).expect("load");
        assert!(va.train.len() + va.test.len() <= 200 - 53);
        assert_eq!(va.stats_columns(), va.inputs + 1);
        let (mean, std) = stats::from_sum(&va.stats_vector(), va.stats_columns());
        let ys = &va.train.labels;
        let m = ys.iter().sum::<f64>() / ys.len() as f64;
        let sd = (ys.iter().map(|y| (y - m).powi(2)).sum::<f64>() / ys.len() as f64).sqrt();
        assert!(
            (mean[va.inputs] - m).abs() < 1e-3,
            "{} vs {m}",
            mean[va.inputs]
        );
        assert!((std[va.inputs] - sd).abs() < 1e-3);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("bad.csv");
        std::fs::write(&p, "age,num\n40,1\nforty,0\n").expect("write");
        let s: DataSchema = toml::from_str(
            "label = { column = \"num\", greater_than = 0 }\nmissing = \"drop_row\"",
        )
        .expect("schema");
        let err = SiteData::load(&s, &p, None, 0.3, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("\"forty\""), "{err}");
        // A label outside the task's classes names the file, the line and the value.
        let classes: DataSchema =
            toml::from_str("[task]\nkind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2]")
                .expect("schema");
        std::fs::write(&p, "age,num\n40,1\n50,2\n60,7\n").expect("write");
        let err = SiteData::load(&classes, &p, None, 0.3, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.csv") && err.contains("line 4") && err.contains("= 7"),
            "{err}"
        );
        let err = SiteData::load(&s, &dir.path().join("nope.csv"), None, 0.3, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
