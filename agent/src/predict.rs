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
use crate::train;

/// A model read back from an exported file.
#[derive(Debug, Clone)]
pub struct ExportedModel {
    pub spec: ModelSpec,
    pub params: Vec<f32>,
    pub schema: DataSchema,
    pub inputs: Vec<String>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub round: String,
}

/// Scores of one CSV.
#[derive(Debug, Clone)]
pub struct Scored {
    /// (file line, probability of the positive class, label if the file has one).
    pub rows: Vec<(usize, f32, Option<f32>)>,
    pub dropped: Vec<usize>,
    /// Accuracy at threshold 0.5, AUC and loss, when the file has the label column.
    pub evaluation: Option<train::Evaluation>,
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
        Ok(ExportedModel {
            spec,
            params,
            schema,
            inputs,
            mean,
            std,
            round: meta.get("cohort.round").cloned().unwrap_or_default(),
        })
    }

    /// Scores every usable row of `csv`.
    pub fn score(&self, csv: &Path) -> Result<Scored> {
        let data = rows_to_score(&self.schema, csv)?;
        if data.rows.is_empty() {
            bail!(
                "{}: no row can be scored ({} dropped for missing values)",
                csv.display(),
                data.dropped.len()
            );
        }
        let x = data.rows.standardised(&self.mean, &self.std);
        let probs = train::probabilities(&self.spec, &self.params, &x)?;
        let evaluation = if data.labelled {
            Some(train::evaluate(
                &self.spec,
                &self.params,
                &x,
                &data.rows.labels,
            )?)
        } else {
            None
        };
        Ok(Scored {
            rows: data
                .lines
                .iter()
                .zip(probs)
                .zip(&data.rows.labels)
                .map(|((line, p), y)| (*line, p, data.labelled.then_some(*y)))
                .collect(),
            dropped: data.dropped,
            evaluation,
        })
    }
}
