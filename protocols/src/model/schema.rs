//! The data schema every site must share: which CSV columns are features, how the label is
//! derived, how categories are one-hot encoded and what happens to missing values.
//!
//! Categories are listed in the configuration rather than discovered from the data, because
//! discovering them would make a site's encoding depend on its own data: two sites could then
//! disagree about what input 7 means. The schema's hash is exchanged at join time, so an agent
//! configured differently from the coordinator is refused instead of silently training on
//! misaligned inputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use thiserror::Error;

use super::task::{Task, TaskTable};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingValues {
    /// Drop every row with a missing value in a used column (the default: a dataset without
    /// missing values need not say anything).
    #[default]
    DropRow,
    /// Replace a missing value with the federated mean of the column.
    ImputeMean,
}

/// The binary shorthand `label = { column, greater_than }`: positive when
/// `value > greater_than`. The same as `[schema.task] kind = "binary"`, and hashed alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    pub column: String,
    pub greater_than: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SchemaTable", into = "SchemaTable")]
pub struct DataSchema {
    /// What the model predicts from which column (`[schema.task]`, or the binary shorthand
    /// `label`).
    pub task: Task,
    /// Feature columns in order. Empty: every column but the label and `drop`.
    pub features: Vec<String>,
    pub drop: Vec<String>,
    /// Categorical columns and their levels; encoded one-hot with the first level dropped.
    pub categorical: BTreeMap<String, Vec<f64>>,
    pub missing: MissingValues,
    /// Image data (`[schema.images]`): every image is converted to `channels` (1: grayscale,
    /// 3: RGB) and resized to `height` × `width`; its pixels, scaled to [0, 1] in
    /// channel-major order, are the model's inputs. The label is the image's class name
    /// (its folder, or the manifest's label column), one of the task's `class_names`.
    pub images: Option<ImageShape>,
}

/// The shape every image is brought to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn inputs(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// `[schema]` as written. A binary task is written back in the shorthand, so a schema that
/// predates `[schema.task]` reads, writes and hashes as it always did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<LabelRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<TaskTable>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    categorical: BTreeMap<String, Vec<f64>>,
    #[serde(default)]
    missing: MissingValues,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    images: Option<ImageShape>,
}

impl TryFrom<SchemaTable> for DataSchema {
    type Error = String;

    fn try_from(t: SchemaTable) -> Result<Self, String> {
        let task = match (t.label, t.task) {
            (Some(_), Some(_)) => {
                return Err("give either label = { column, greater_than } (the binary shorthand) or a [schema.task] table, not both".into());
            }
            (None, None) => {
                return Err("the schema names no label: add a [schema.task] table (kind = \"binary\", \"multiclass\" or \"regression\", label = \"COLUMN\"), or label = { column, greater_than } for a binary task".into());
            }
            (Some(l), None) => Task::Binary {
                label: l.column,
                greater_than: l.greater_than,
            },
            (None, Some(t)) => Task::try_from(t)?,
        };
        if let Some(i) = &t.images {
            if !matches!(i.channels, 1 | 3) {
                return Err(format!(
                    "images.channels = {}: 1 (grayscale) or 3 (RGB)",
                    i.channels
                ));
            }
            if i.height == 0 || i.width == 0 || i.height * i.width > 1 << 20 {
                return Err(format!(
                    "images: {} × {} pixels: each side at least 1, at most 2^20 pixels",
                    i.height, i.width
                ));
            }
            let Task::Multiclass { class_names, .. } = &task else {
                return Err("image data needs a multiclass task whose class_names are the image classes (folder names)".into());
            };
            if class_names.is_empty() {
                return Err("image data needs task.class_names: the class folders' (or manifest labels') names, in order".into());
            }
            if !(t.features.is_empty() && t.drop.is_empty() && t.categorical.is_empty()) {
                return Err(
                    "features, drop and categorical describe CSV columns; image data has none"
                        .into(),
                );
            }
        }
        Ok(DataSchema {
            task,
            features: t.features,
            drop: t.drop,
            categorical: t.categorical,
            missing: t.missing,
            images: t.images,
        })
    }
}

impl From<DataSchema> for SchemaTable {
    fn from(s: DataSchema) -> Self {
        let (label, task) = match &s.task {
            Task::Binary {
                label,
                greater_than,
            } => (
                Some(LabelRule {
                    column: label.clone(),
                    greater_than: *greater_than,
                }),
                None,
            ),
            other => (None, Some(other.to_table())),
        };
        SchemaTable {
            label,
            task,
            features: s.features,
            drop: s.drop,
            categorical: s.categorical,
            missing: s.missing,
            images: s.images,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SchemaError {
    #[error("column {0:?} is named by the schema but not in the CSV header")]
    MissingColumn(String),
    #[error("column {0:?} appears twice in the CSV header")]
    DuplicateColumn(String),
    #[error("categorical column {column:?} has no levels")]
    NoLevels { column: String },
    #[error("line {row}: column {column:?} has value {value}, not one of its levels {levels:?}")]
    UnknownLevel {
        row: usize,
        column: String,
        value: f64,
        levels: Vec<f64>,
    },
    #[error("{0}")]
    BadLabel(String),
    #[error("line {row} has {got} fields, the header has {expected}")]
    RowLength {
        row: usize,
        got: usize,
        expected: usize,
    },
    #[error("the schema uses no feature columns")]
    NoFeatures,
}

/// A schema resolved against a CSV header.
#[derive(Debug, Clone)]
pub struct Resolved {
    label: usize,
    /// (column index, levels if categorical)
    columns: Vec<(usize, String, Option<Vec<f64>>)>,
    width: usize,
    missing: MissingValues,
    task: Task,
}

/// One encoded row: features (None where missing) and the training target: 0/1 for a
/// binary task, the class index for a multiclass one, the label's value for regression.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRow {
    pub features: Vec<Option<f64>>,
    pub label: f64,
}

/// An image's inputs, channel-major: `c0/y0/x0`, `c0/y0/x1`, …
pub fn image_input_names(i: &ImageShape) -> Vec<String> {
    (0..i.channels)
        .flat_map(|c| {
            (0..i.height).flat_map(move |y| (0..i.width).map(move |x| format!("c{c}/y{y}/x{x}")))
        })
        .collect()
}

impl DataSchema {
    /// A stable digest of everything that affects the encoding.
    pub fn hash(&self) -> String {
        let mut h = Sha3_256::new();
        let mut put = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        put("cohort-schema-v1");
        put(self.task.label());
        self.task.hash_into(&mut put);
        for f in &self.features {
            put(f);
        }
        put("|drop");
        for d in &self.drop {
            put(d);
        }
        put("|categorical");
        for (c, levels) in &self.categorical {
            put(c);
            for l in levels {
                put(&l.to_bits().to_string());
            }
        }
        put(match self.missing {
            MissingValues::DropRow => "drop_row",
            MissingValues::ImputeMean => "impute_mean",
        });
        if let Some(i) = &self.images {
            put("|images");
            for n in [i.channels, i.height, i.width] {
                put(&n.to_string());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The keys in which `other` differs from this schema, each with both values written as
    /// in the TOML file, e.g. `missing: "drop_row" here, "impute_mean" there`. Empty when
    /// they encode alike.
    pub fn differences(&self, other: &DataSchema) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |key: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{key}: {a} here, {b} there"));
            }
        };
        differ(
            "task",
            toml_text(&self.task.to_table()),
            toml_text(&other.task.to_table()),
        );
        differ(
            "features",
            toml_text(&self.features),
            toml_text(&other.features),
        );
        differ("drop", toml_text(&self.drop), toml_text(&other.drop));
        let columns: std::collections::BTreeSet<&String> = self
            .categorical
            .keys()
            .chain(other.categorical.keys())
            .collect();
        for c in columns {
            let levels = |s: &DataSchema| {
                s.categorical
                    .get(c)
                    .map_or("(not categorical)".to_string(), toml_text)
            };
            differ(&format!("categorical.{c}"), levels(self), levels(other));
        }
        differ(
            "missing",
            toml_text(&self.missing),
            toml_text(&other.missing),
        );
        differ(
            "images",
            self.images.as_ref().map_or("(none)".to_string(), toml_text),
            other
                .images
                .as_ref()
                .map_or("(none)".to_string(), toml_text),
        );
        out
    }

    /// The feature columns in order, given the CSV header.
    fn feature_columns(&self, header: &[String]) -> Vec<String> {
        if self.features.is_empty() {
            header
                .iter()
                .filter(|c| c.as_str() != self.task.label() && !self.drop.contains(c))
                .cloned()
                .collect()
        } else {
            self.features
                .iter()
                .filter(|c| !self.drop.contains(c))
                .cloned()
                .collect()
        }
    }

    /// Number of model inputs for a CSV with this header.
    pub fn input_dim(&self, header: &[String]) -> Result<usize, SchemaError> {
        Ok(self.resolve(header)?.width)
    }

    /// Names of the model inputs (one-hot columns as `column=level`).
    pub fn input_names(&self, header: &[String]) -> Result<Vec<String>, SchemaError> {
        let r = self.resolve(header)?;
        Ok(r.columns
            .iter()
            .flat_map(|(_, name, levels)| match levels {
                None => vec![name.clone()],
                Some(l) => l[1..].iter().map(|v| format!("{name}={v}")).collect(),
            })
            .collect())
    }

    /// The model inputs' names when the schema lists its `features`, which is what lets the
    /// coordinator know the model's width without seeing a CSV (None when it does not).
    pub fn declared_inputs(&self) -> Option<Result<Vec<String>, SchemaError>> {
        if let Some(i) = &self.images {
            return Some(Ok(image_input_names(i)));
        }
        if self.features.is_empty() {
            return None;
        }
        let mut header = self.features.clone();
        for c in std::iter::once(self.task.label()).chain(self.drop.iter().map(String::as_str)) {
            if !header.iter().any(|h| h == c) {
                header.push(c.to_string());
            }
        }
        Some(self.input_names(&header))
    }

    pub fn resolve(&self, header: &[String]) -> Result<Resolved, SchemaError> {
        for (i, c) in header.iter().enumerate() {
            if header[..i].contains(c) {
                return Err(SchemaError::DuplicateColumn(c.clone()));
            }
        }
        let index = |c: &str| {
            header
                .iter()
                .position(|h| h == c)
                .ok_or_else(|| SchemaError::MissingColumn(c.to_string()))
        };
        let label = index(self.task.label())?;
        for c in self.drop.iter().chain(self.categorical.keys()) {
            index(c)?;
        }
        let mut columns = Vec::new();
        let mut width = 0;
        for name in self.feature_columns(header) {
            let i = index(&name)?;
            let levels = match self.categorical.get(&name) {
                Some(l) if l.is_empty() => {
                    return Err(SchemaError::NoLevels { column: name });
                }
                Some(l) => {
                    width += l.len() - 1;
                    Some(l.clone())
                }
                None => {
                    width += 1;
                    None
                }
            };
            columns.push((i, name, levels));
        }
        if width == 0 {
            return Err(SchemaError::NoFeatures);
        }
        Ok(Resolved {
            label,
            columns,
            width,
            missing: self.missing,
            task: self.task.clone(),
        })
    }
}

impl Resolved {
    pub fn width(&self) -> usize {
        self.width
    }

    /// Encodes one CSV row (`None` = empty cell). `Ok(None)`: the row is dropped, for a
    /// missing label or for a missing value under [`MissingValues::DropRow`].
    pub fn encode(
        &self,
        row_number: usize,
        row: &[Option<f64>],
        header_len: usize,
    ) -> Result<Option<EncodedRow>, SchemaError> {
        if row.len() != header_len {
            return Err(SchemaError::RowLength {
                row: row_number,
                got: row.len(),
                expected: header_len,
            });
        }
        // A row without a label can be neither trained nor judged on, and a label cannot be
        // imputed: it is dropped under either missing-value rule (and counted by the caller).
        let Some(label) = row[self.label] else {
            return Ok(None);
        };
        let mut features = Vec::with_capacity(self.width);
        for (i, name, levels) in &self.columns {
            let value = row[*i];
            if value.is_none() && self.missing == MissingValues::DropRow {
                return Ok(None);
            }
            match (levels, value) {
                (None, v) => features.push(v),
                (Some(l), None) => features.extend(std::iter::repeat_n(None, l.len() - 1)),
                (Some(l), Some(v)) => {
                    let Some(pos) = l.iter().position(|x| *x == v) else {
                        return Err(SchemaError::UnknownLevel {
                            row: row_number,
                            column: name.clone(),
                            value: v,
                            levels: l.clone(),
                        });
                    };
                    features.extend((1..l.len()).map(|k| Some(if k == pos { 1.0 } else { 0.0 })));
                }
            }
        }
        let label = self
            .task
            .target(row_number, label)
            .map_err(SchemaError::BadLabel)?;
        Ok(Some(EncodedRow { features, label }))
    }
}

/// A value as it is written in a TOML file (an inline table for a table): what a reader of
/// an error message typed, not Rust's debug form.
fn toml_text<T: Serialize + std::fmt::Debug>(v: &T) -> String {
    match toml::Value::try_from(v) {
        Ok(toml::Value::Table(t)) => {
            let fields: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("{{ {} }}", fields.join(", "))
        }
        Ok(value) => value.to_string(),
        Err(_) => format!("{v:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_key_that_differs_with_both_values() {
        let ours = flamby();
        assert!(ours.differences(&ours.clone()).is_empty());
        let mut theirs = ours.clone();
        theirs.missing = MissingValues::ImputeMean;
        theirs.categorical.insert("cp".into(), vec![1.0, 2.0, 3.0]);
        theirs.categorical.insert("sex".into(), vec![0.0, 1.0]);
        let d = ours.differences(&theirs);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].starts_with("categorical.cp: [1.0, 2.0, 3.0, 4.0] here, [1.0, 2.0, 3.0] there"),
            "{d:?}"
        );
        assert!(
            d[1].starts_with("categorical.sex: (not categorical) here"),
            "{d:?}"
        );
        assert_eq!(d[2], r#"missing: "drop_row" here, "impute_mean" there"#);
        // A task is written as a TOML table, not as Rust's debug output.
        let mut multi = ours.clone();
        multi.task = toml::from_str::<DataSchema>(
            "label = { column = \"num\", greater_than = 1 }\nmissing = \"drop_row\"",
        )
        .unwrap()
        .task;
        let d = ours.differences(&multi);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("task: {"), "{d:?}");
        assert!(d[0].contains("greater_than = 1"), "{d:?}");
        assert!(!d[0].contains("TaskTable"), "{d:?}");
        // The TOML an agent sends round-trips to the same schema.
        let sent = toml::to_string(&theirs).unwrap_or_default();
        let back: DataSchema = toml::from_str(&sent).unwrap_or_else(|e| panic!("{e}: {sent}"));
        assert_eq!(back, theirs);
    }

    fn flamby() -> DataSchema {
        toml::from_str(
            r#"
            label = { column = "num", greater_than = 0 }
            drop = ["slope", "ca", "thal"]
            categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
            missing = "drop_row"
            "#,
        )
        .unwrap()
    }

    fn header() -> Vec<String> {
        "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"
            .split(',')
            .map(String::from)
            .collect()
    }

    #[test]
    fn flamby_encoding_has_13_inputs() {
        let s = flamby();
        assert_eq!(s.input_dim(&header()).unwrap(), 13);
        let names = s.input_names(&header()).unwrap();
        assert_eq!(names[2..5], ["cp=2", "cp=3", "cp=4"]);
        let r = s.resolve(&header()).unwrap();
        let row: Vec<Option<f64>> = [
            63., 1., 1., 145., 233., 1., 2., 150., 0., 2.3, 3., 0., 6., 2.,
        ]
        .into_iter()
        .map(Some)
        .collect();
        let e = r.encode(1, &row, 14).unwrap().unwrap();
        assert_eq!(e.label, 1.0);
        assert_eq!(e.features.len(), 13);
        // cp = 1 is the dropped first level; restecg = 2 is the last one-hot column of restecg
        assert_eq!(e.features[2..5], [Some(0.0), Some(0.0), Some(0.0)]);
        assert_eq!(e.features[8..10], [Some(0.0), Some(1.0)]);
        let mut missing = row.clone();
        missing[3] = None;
        assert_eq!(r.encode(2, &missing, 14).unwrap(), None);
        missing[10] = None; // slope is dropped: irrelevant
        let mut unlabelled = row.clone();
        unlabelled[13] = None;
        assert_eq!(r.encode(5, &unlabelled, 14).unwrap(), None);
        let mut bad = row.clone();
        bad[2] = Some(9.0);
        assert!(matches!(
            r.encode(3, &bad, 14),
            Err(SchemaError::UnknownLevel { .. })
        ));
        assert!(matches!(
            r.encode(4, &row[1..], 14),
            Err(SchemaError::RowLength { .. })
        ));
    }

    #[test]
    fn missing_defaults_to_drop_row_and_hashes_like_saying_so() {
        let implicit: DataSchema =
            toml::from_str("label = { column = \"num\", greater_than = 0 }").unwrap();
        let explicit: DataSchema = toml::from_str(
            "label = { column = \"num\", greater_than = 0 }\nmissing = \"drop_row\"",
        )
        .unwrap();
        assert_eq!(implicit.missing, MissingValues::DropRow);
        assert_eq!(implicit.hash(), explicit.hash());
    }

    #[test]
    fn the_task_table_and_the_binary_shorthand_are_one_schema() {
        let shorthand = flamby();
        let table: DataSchema = toml::from_str(
            r#"
            drop = ["slope", "ca", "thal"]
            categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
            [task]
            kind = "binary"
            label = "num"
            greater_than = 0
            "#,
        )
        .unwrap();
        assert_eq!(table, shorthand);
        assert_eq!(table.hash(), shorthand.hash());
        let multi: DataSchema = toml::from_str(
            "drop = [\"slope\", \"ca\", \"thal\"]\n[task]\nkind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2, 3, 4]",
        )
        .unwrap();
        assert_ne!(multi.hash(), shorthand.hash());
        assert_eq!(multi.task.outputs(), 5);
        // The TOML sent to agents round-trips, the task included.
        let sent = toml::to_string(&multi).unwrap_or_default();
        assert_eq!(
            toml::from_str::<DataSchema>(&sent).ok(),
            Some(multi.clone())
        );
        assert!(
            multi.differences(&shorthand)[0].starts_with("task:"),
            "{:?}",
            multi.differences(&shorthand)
        );
        // A class outside the declared ones names the line and the value.
        let r = multi.resolve(&header()).unwrap();
        let mut row: Vec<Option<f64>> = vec![Some(1.0); 14];
        row[13] = Some(9.0);
        let err = r.encode(12, &row, 14).unwrap_err().to_string();
        assert!(err.contains("line 12") && err.contains("= 9"), "{err}");
        row[13] = Some(3.0);
        assert_eq!(r.encode(12, &row, 14).unwrap().map(|e| e.label), Some(3.0));
        for (text, needle) in [
            (
                "label = { column = \"num\", greater_than = 0 }\n[task]\nkind = \"regression\"\nlabel = \"chol\"",
                "not both",
            ),
            ("drop = []", "names no label"),
        ] {
            let err = toml::from_str::<DataSchema>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn hash_changes_with_the_encoding_and_errors_name_columns() {
        let a = flamby();
        let mut b = flamby();
        b.drop.pop();
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), flamby().hash());
        let mut c = flamby();
        c.categorical.insert("nope".into(), vec![1.0]);
        assert_eq!(
            c.resolve(&header()).unwrap_err(),
            SchemaError::MissingColumn("nope".into())
        );
        assert!(
            toml::from_str::<DataSchema>(
                "label = { column = \"num\", greater_than = 0 }\nmissing = \"drop_row\"\nbogus = 1"
            )
            .is_err()
        );
    }
}
