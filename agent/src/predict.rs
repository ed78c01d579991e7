//! `cohort-agent predict`: scores a CSV with a model exported by `cohort-coordinator
//! export-model`, using only what the file carries — the schema, the input order and the
//! standardisation statistics — so a prediction outside a federation is computed exactly as
//! the federation evaluated it.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use cohort_protocols::model::{self, DataSchema, ModelSpec};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

use crate::data::rows_to_score;
use crate::model::{Evaluation, Objective, evaluate_outputs};

/// A model read back from an exported file.
#[derive(Debug, Clone)]
pub struct ExportedModel {
    pub spec: ModelSpec,
    pub params: Vec<f32>,
    pub schema: DataSchema,
    pub inputs: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// The regression label's federated (mean, std) when the task standardises it.
    pub label_scaling: Option<(f64, f64)>,
    pub round: String,
}

/// One scored row.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRow {
    /// The file line (the header is line 1).
    pub line: usize,
    /// The class index (classification) or the predicted value in the label's units.
    pub prediction: f64,
    /// Binary: the positive class's probability; multiclass: every class's.
    pub probabilities: Vec<f32>,
    /// The row's training target when the file has the label column (class index or value).
    pub label: Option<f64>,
}

/// Scores of one CSV or image set.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Image data: each row's file (rows are numbered from 1 in `line`).
    pub files: Vec<String>,
    pub rows: Vec<ScoredRow>,
    pub dropped: Vec<usize>,
    /// The task's metrics and loss, when the file has the label column.
    pub evaluation: Option<Evaluation>,
}

impl ExportedModel {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let what = || format!("{}: not a model exported by Cohort", path.display());
        let (_, meta) = SafeTensors::read_metadata(&bytes).with_context(what)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key)
                .cloned()
                .ok_or_else(|| anyhow!("{}: metadata {key} is missing", what()))
        };
        let spec: ModelSpec = serde_json::from_str(&get("cohort.model_spec")?)
            .with_context(|| format!("{}: cohort.model_spec", path.display()))?;
        let schema: DataSchema = serde_json::from_str(&get("cohort.schema")?)
            .with_context(|| format!("{}: cohort.schema", path.display()))?;
        let inputs: Vec<String> = serde_json::from_str(&get("cohort.inputs")?)
            .with_context(|| format!("{}: cohort.inputs", path.display()))?;
        let st = SafeTensors::deserialize(&bytes).with_context(what)?;
        let f32s = |name: &str| -> Option<(Vec<usize>, Vec<f32>)> {
            let t = st.tensor(name).ok()?;
            (t.dtype() == Dtype::F32).then(|| {
                let v = t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (t.shape().to_vec(), v)
            })
        };
        let f64s = |name: &str| -> Result<Vec<f64>> {
            let t = st
                .tensor(name)
                .map_err(|_| anyhow!("{}: tensor {name} is missing", path.display()))?;
            if t.dtype() != Dtype::F64 || t.shape() != [spec.inputs] {
                bail!(
                    "{}: tensor {name} must be float64 of shape [{}]",
                    path.display(),
                    spec.inputs
                );
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        };
        let params = spec
            .from_pytorch_tensors(f32s)
            .with_context(|| format!("{}", path.display()))?;
        spec.check(&params)?;
        if model::params_sha3_512(&params)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            != get("cohort.sha3_512")?
        {
            bail!(
                "{}: the weights do not match the SHA3-512 recorded at export (the file was changed)",
                path.display()
            );
        }
        let (mean, std) = (f64s("preprocess.mean")?, f64s("preprocess.std")?);
        if inputs.len() != spec.inputs || std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            bail!(
                "{}: {} input names and {} statistics for a model of {} inputs",
                path.display(),
                inputs.len(),
                mean.len(),
                spec.inputs
            );
        }
        let label_scaling = if schema.task.standardises_label() {
            let t = st.tensor("preprocess.label").map_err(|_| {
                anyhow!(
                    "{}: the task standardises its label but tensor preprocess.label (mean, std) is missing",
                    path.display()
                )
            })?;
            let v: Vec<f64> = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            match (t.dtype(), v.as_slice()) {
                (Dtype::F64, [m, s]) if m.is_finite() && s.is_finite() && *s > 0.0 => {
                    Some((*m, *s))
                }
                _ => bail!(
                    "{}: tensor preprocess.label must be float64 [mean, std] with std > 0",
                    path.display()
                ),
            }
        } else {
            None
        };
        if spec.outputs != schema.task.outputs() {
            bail!(
                "{}: the model has {} outputs, its task needs {}",
                path.display(),
                spec.outputs,
                schema.task.outputs()
            );
        }
        Ok(ExportedModel {
            spec,
            params,
            schema,
            inputs,
            mean,
            std,
            label_scaling,
            round: meta.get("cohort.round").cloned().unwrap_or_default(),
        })
    }

    /// How the outputs are read: the task, with the label's scaling.
    pub fn objective(&self) -> Objective {
        Objective::new(&self.schema.task, self.label_scaling)
    }

    /// Scores every image of `source` (the schema's image data: a class-folder tree or a
    /// manifest of path,label), as the federation evaluated its sites' images.
    pub fn score_images(&self, source: &crate::data::images::ImageSource) -> Result<Scored> {
        if self.schema.images.is_none() {
            bail!("the model was not trained on images (its schema has no [schema.images])");
        }
        let listed = crate::data::images::list(source)?;
        let rows = crate::data::images::load_files(&self.schema, &listed)?;
        if rows.is_empty() {
            bail!("no images (png or jpg) found");
        }
        let lines = (1..=rows.len()).collect::<Vec<_>>();
        let (rows, evaluation) = self.scored(&rows, &lines, true)?;
        Ok(Scored {
            files: listed
                .into_iter()
                .map(|(p, _)| p.display().to_string())
                .collect(),
            rows,
            dropped: Vec::new(),
            evaluation,
        })
    }

    /// Scores every usable row of `csv`.
    pub fn score(&self, csv: &Path) -> Result<Scored> {
        if self.schema.images.is_some() {
            bail!(
                "the model was trained on images: score images with --images (a folder of class folders, or a path,label manifest)"
            );
        }
        let data = rows_to_score(&self.schema, csv)?;
        if data.rows.is_empty() {
            bail!(
                "{}: no row can be scored ({} dropped for missing values)",
                csv.display(),
                data.dropped.len()
            );
        }
        let (rows, evaluation) = self.scored(&data.rows, &data.lines, data.labelled)?;
        Ok(Scored {
            files: Vec::new(),
            rows,
            dropped: data.dropped,
            evaluation,
        })
    }

    /// Each row's prediction (numbered by `lines`) and, when the rows are `labelled`, the
    /// task's evaluation — from one pass of the model.
    fn scored(
        &self,
        rows: &crate::data::Rows,
        lines: &[usize],
        labelled: bool,
    ) -> Result<(Vec<ScoredRow>, Option<Evaluation>)> {
        let x = rows.standardised(&self.mean, &self.std);
        let objective = self.objective();
        let width = self.spec.outputs.max(1);
        let outputs = crate::model::outputs(&self.spec, &self.params, &x)?;
        let evaluation = if labelled {
            Some(evaluate_outputs(&objective, width, &outputs, &rows.labels)?)
        } else {
            None
        };
        let multiclass = matches!(objective, Objective::Multiclass { .. });
        let scored = lines
            .iter()
            .zip(outputs.chunks(width))
            .zip(&rows.labels)
            .map(|((line, out), y)| {
                let (prediction, p) = objective.read(out);
                ScoredRow {
                    line: *line,
                    prediction,
                    probabilities: if multiclass {
                        Objective::probabilities(out)
                    } else {
                        p.into_iter().collect()
                    },
                    label: labelled.then_some(*y),
                }
            })
            .collect();
        Ok((scored, evaluation))
    }
}
