//! What the model predicts: the learning task every site trains for.
//!
//! The task lives inside the data schema (`[schema.task]`) rather than beside it because it is
//! part of the same contract: it decides how a CSV's label column becomes a training target,
//! so it must be signed, hashed and pinned with the rest of the encoding. A site whose task
//! differs (other classes, another label column) is refused at join like any other schema
//! mismatch, instead of training an output layer that means something else.

use serde::{Deserialize, Serialize};

/// The loss of a regression task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegressionLoss {
    /// Mean squared error on the (optionally standardised) label.
    #[default]
    Mse,
    /// Poisson deviance with a log link: the model predicts log(rate); the label is a count.
    Poisson,
}

/// The learning task.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Positive when `label > greater_than`; one sigmoid output.
    Binary { label: String, greater_than: f64 },
    /// The label column holds one of `classes`; softmax over one output per class,
    /// cross-entropy weighted by `class_weights` (all 1 when not given).
    Multiclass {
        label: String,
        classes: Vec<f64>,
        class_names: Vec<String>,
        class_weights: Vec<f64>,
    },
    /// A numeric label; one output. With `standardise` the label is z-scored with the
    /// federation's securely aggregated mean and standard deviation for training, and every
    /// prediction and metric is converted back to the label's units.
    Regression {
        label: String,
        loss: RegressionLoss,
        standardise: bool,
    },
}

/// The task as written in TOML (`[schema.task]`), checked into a [`Task`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTable {
    pub kind: TaskKind,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greater_than: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<RegressionLoss>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardise: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Binary,
    Multiclass,
    Regression,
}

impl Task {
    pub fn label(&self) -> &str {
        match self {
            Task::Binary { label, .. }
            | Task::Multiclass { label, .. }
            | Task::Regression { label, .. } => label,
        }
    }

    pub fn kind(&self) -> TaskKind {
        match self {
            Task::Binary { .. } => TaskKind::Binary,
            Task::Multiclass { .. } => TaskKind::Multiclass,
            Task::Regression { .. } => TaskKind::Regression,
        }
    }

    /// Width of the model's output layer.
    pub fn outputs(&self) -> usize {
        match self {
            Task::Multiclass { classes, .. } => classes.len(),
            _ => 1,
        }
    }

    /// Number of classes of a classification task (2 for binary), 0 for regression.
    pub fn classes(&self) -> usize {
        match self {
            Task::Binary { .. } => 2,
            Task::Multiclass { classes, .. } => classes.len(),
            Task::Regression { .. } => 0,
        }
    }

    /// Class names for reports: the declared names, or the values as written.
    pub fn class_names(&self) -> Vec<String> {
        match self {
            Task::Binary { greater_than, .. } => {
                vec![format!("<= {greater_than}"), format!("> {greater_than}")]
            }
            Task::Multiclass {
                classes,
                class_names,
                ..
            } => {
                if class_names.is_empty() {
                    classes.iter().map(|c| c.to_string()).collect()
                } else {
                    class_names.clone()
                }
            }
            Task::Regression { .. } => Vec::new(),
        }
    }

    /// Whether the label takes part in the federated statistics (as one more column after
    /// the model inputs) so it can be standardised.
    pub fn standardises_label(&self) -> bool {
        matches!(
            self,
            Task::Regression {
                standardise: true,
                ..
            }
        )
    }

    /// The training target for a label value read from `line`, or why it cannot be one.
    pub fn target(&self, line: usize, value: f64) -> Result<f64, String> {
        match self {
            Task::Binary { greater_than, .. } => {
                Ok(if value > *greater_than { 1.0 } else { 0.0 })
            }
            Task::Multiclass { label, classes, .. } => classes
                .iter()
                .position(|c| *c == value)
                .map(|p| p as f64)
                .ok_or_else(|| {
                    format!(
                        "line {line}: label {label:?} = {value} is not one of the task's classes {classes:?}"
                    )
                }),
            Task::Regression {
                label,
                loss: RegressionLoss::Poisson,
                ..
            } if value < 0.0 => Err(format!(
                "line {line}: label {label:?} = {value} is negative; a Poisson loss needs counts ≥ 0"
            )),
            Task::Regression { .. } => Ok(value),
        }
    }

    pub fn to_table(&self) -> TaskTable {
        let mut t = TaskTable {
            kind: self.kind(),
            label: self.label().to_string(),
            greater_than: None,
            classes: None,
            class_names: None,
            class_weights: None,
            loss: None,
            standardise: None,
        };
        match self {
            Task::Binary { greater_than, .. } => t.greater_than = Some(*greater_than),
            Task::Multiclass {
                classes,
                class_names,
                class_weights,
                ..
            } => {
                t.classes = Some(classes.clone());
                t.class_names = (!class_names.is_empty()).then(|| class_names.clone());
                t.class_weights = (!class_weights.is_empty()).then(|| class_weights.clone());
            }
            Task::Regression {
                loss, standardise, ..
            } => {
                t.loss = Some(*loss);
                t.standardise = Some(*standardise);
            }
        }
        t
    }

    /// Feeds everything that defines the task to a hash, after the label column (which the
    /// binary form has always hashed first, so a binary schema's hash is unchanged).
    pub(crate) fn hash_into(&self, put: &mut dyn FnMut(&str)) {
        match self {
            Task::Binary { greater_than, .. } => put(&greater_than.to_bits().to_string()),
            Task::Multiclass {
                classes,
                class_names,
                class_weights,
                ..
            } => {
                put("|multiclass");
                for c in classes {
                    put(&c.to_bits().to_string());
                }
                put("|names");
                for n in class_names {
                    put(n);
                }
                put("|weights");
                for w in class_weights {
                    put(&w.to_bits().to_string());
                }
            }
            Task::Regression {
                loss, standardise, ..
            } => {
                put("|regression");
                put(match loss {
                    RegressionLoss::Mse => "mse",
                    RegressionLoss::Poisson => "poisson",
                });
                put(if *standardise { "standardise" } else { "raw" });
            }
        }
    }
}

impl TryFrom<TaskTable> for Task {
    type Error = String;

    fn try_from(t: TaskTable) -> Result<Self, String> {
        let only = |key: &str, present: bool, kind: &str| {
            if present {
                Err(format!(
                    "task.{key} does not apply to kind = \"{kind}\" (remove it)"
                ))
            } else {
                Ok(())
            }
        };
        if t.label.trim().is_empty() {
            return Err("task.label is empty: name the label column".into());
        }
        match t.kind {
            TaskKind::Binary => {
                for (k, p) in [
                    ("classes", t.classes.is_some()),
                    ("class_names", t.class_names.is_some()),
                    ("class_weights", t.class_weights.is_some()),
                    ("loss", t.loss.is_some()),
                    ("standardise", t.standardise.is_some()),
                ] {
                    only(k, p, "binary")?;
                }
                let greater_than = t.greater_than.ok_or(
                    "kind = \"binary\" needs task.greater_than (positive when label > greater_than)",
                )?;
                if !greater_than.is_finite() {
                    return Err(format!(
                        "task.greater_than = {greater_than}: not a finite number"
                    ));
                }
                Ok(Task::Binary {
                    label: t.label,
                    greater_than,
                })
            }
            TaskKind::Multiclass => {
                for (k, p) in [
                    ("greater_than", t.greater_than.is_some()),
                    ("loss", t.loss.is_some()),
                    ("standardise", t.standardise.is_some()),
                ] {
                    only(k, p, "multiclass")?;
                }
                let classes = t.classes.ok_or(
                    "kind = \"multiclass\" needs task.classes, the label values in order (e.g. classes = [0, 1, 2, 3, 4])",
                )?;
                if classes.len() < 2 {
                    return Err(format!(
                        "task.classes = {classes:?}: a multiclass task needs at least two classes"
                    ));
                }
                for (i, c) in classes.iter().enumerate() {
                    if !c.is_finite() {
                        return Err(format!("task.classes: {c} is not a finite number"));
                    }
                    if classes[..i].contains(c) {
                        return Err(format!("task.classes: {c} is listed twice"));
                    }
                }
                let class_names = t.class_names.unwrap_or_default();
                if !class_names.is_empty() && class_names.len() != classes.len() {
                    return Err(format!(
                        "task.class_names has {} names for {} classes",
                        class_names.len(),
                        classes.len()
                    ));
                }
                let class_weights = t.class_weights.unwrap_or_default();
                if !class_weights.is_empty() && class_weights.len() != classes.len() {
                    return Err(format!(
                        "task.class_weights has {} weights for {} classes",
                        class_weights.len(),
                        classes.len()
                    ));
                }
                if let Some(w) = class_weights.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
                    return Err(format!("task.class_weights: {w} must be > 0"));
                }
                Ok(Task::Multiclass {
                    label: t.label,
                    classes,
                    class_names,
                    class_weights,
                })
            }
            TaskKind::Regression => {
                for (k, p) in [
                    ("greater_than", t.greater_than.is_some()),
                    ("classes", t.classes.is_some()),
                    ("class_names", t.class_names.is_some()),
                    ("class_weights", t.class_weights.is_some()),
                ] {
                    only(k, p, "regression")?;
                }
                let loss = t.loss.unwrap_or_default();
                let standardise = t.standardise.unwrap_or(loss == RegressionLoss::Mse);
                if standardise && loss == RegressionLoss::Poisson {
                    return Err(
                        "task.standardise = true with loss = \"poisson\": a Poisson target must stay a count (leave standardise out)"
                            .into(),
                    );
                }
                Ok(Task::Regression {
                    label: t.label,
                    loss,
                    standardise,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Task, String> {
        let t: TaskTable = toml::from_str(text).map_err(|e| e.to_string())?;
        Task::try_from(t)
    }

    #[test]
    fn each_kind_parses_and_round_trips() {
        for text in [
            "kind = \"binary\"\nlabel = \"num\"\ngreater_than = 0",
            "kind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2]\nclass_names = [\"a\", \"b\", \"c\"]\nclass_weights = [1, 2, 3]",
            "kind = \"regression\"\nlabel = \"thalach\"",
            "kind = \"regression\"\nlabel = \"visits\"\nloss = \"poisson\"",
        ] {
            let task = parse(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(Task::try_from(task.to_table()), Ok(task.clone()), "{text}");
        }
        let mse = parse("kind = \"regression\"\nlabel = \"y\"").unwrap_or_else(|e| panic!("{e}"));
        assert!(mse.standardises_label());
        let poisson = parse("kind = \"regression\"\nlabel = \"y\"\nloss = \"poisson\"")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!poisson.standardises_label());
    }

    #[test]
    fn inconsistent_tasks_are_refused_naming_the_key() {
        for (text, needle) in [
            (
                "kind = \"binary\"\nlabel = \"num\"",
                "needs task.greater_than",
            ),
            (
                "kind = \"binary\"\nlabel = \"num\"\ngreater_than = 0\nclasses = [0, 1]",
                "task.classes does not apply",
            ),
            (
                "kind = \"multiclass\"\nlabel = \"num\"",
                "needs task.classes",
            ),
            (
                "kind = \"multiclass\"\nlabel = \"num\"\nclasses = [1]",
                "at least two classes",
            ),
            (
                "kind = \"multiclass\"\nlabel = \"num\"\nclasses = [1, 2, 1]",
                "1 is listed twice",
            ),
            (
                "kind = \"multiclass\"\nlabel = \"num\"\nclasses = [1, 2]\nclass_weights = [1]",
                "1 weights for 2 classes",
            ),
            (
                "kind = \"multiclass\"\nlabel = \"num\"\nclasses = [1, 2]\nclass_weights = [1, 0]",
                "must be > 0",
            ),
            (
                "kind = \"regression\"\nlabel = \"y\"\nloss = \"poisson\"\nstandardise = true",
                "must stay a count",
            ),
            ("kind = \"ordinal\"\nlabel = \"y\"", "ordinal"),
            (
                "kind = \"regression\"\nlabel = \"y\"\nclases = [1]",
                "clases",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn targets_follow_the_task_and_bad_labels_name_line_and_value() {
        let multi = parse("kind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2, 3, 4]")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(multi.target(2, 3.0), Ok(3.0));
        let err = multi.target(17, 7.0).unwrap_err();
        assert!(err.contains("line 17") && err.contains("= 7"), "{err}");
        let binary = parse("kind = \"binary\"\nlabel = \"num\"\ngreater_than = 0")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(binary.target(2, 3.0), Ok(1.0));
        assert_eq!(binary.target(2, 0.0), Ok(0.0));
        let poisson = parse("kind = \"regression\"\nlabel = \"n\"\nloss = \"poisson\"")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(poisson.target(2, 4.0), Ok(4.0));
        assert!(poisson.target(9, -1.0).unwrap_err().contains("line 9"));
    }
}
