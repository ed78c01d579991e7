//! `cohort-coordinator export-model`: a checkpoint as a self-contained safetensors file.
//!
//! A model is only usable outside Cohort together with the preprocessing it was trained
//! behind: which CSV columns, in which order, how categories become one-hot inputs, what a
//! missing value means, and the federated mean and standard deviation every input is
//! standardised with. The file therefore holds, besides the weights in PyTorch's layout
//! (`nn.Sequential` names, `[d_out, d_in]` weights):
//!
//! - tensors `preprocess.mean` and `preprocess.std` (float64, one per model input), and for a
//!   regression task that standardises its label `preprocess.label` (float64 [mean, std]);
//! - metadata `cohort.inputs` (the inputs' names in order, one-hot inputs as `column=level`),
//!   `cohort.schema` (the data schema as JSON), `cohort.task` (kind, label column, classes,
//!   loss), `cohort.class_names`, `cohort.preprocessing` (the recipe in words),
//!   `cohort.model_spec` (with the output width), the round, the SHA3-512
//!   of Cohort's flat parameter vector and the coordinator's signature of it.
//!
//! It reads the data directory without sled — the round journal for what was committed and
//! the checkpoint files, which carry their own hash and signature — so it works while the
//! coordinator runs and holds sled's lock.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cohort_protocols::model;
use safetensors::tensor::{Dtype, TensorView};

use crate::config::CoordinatorConfig;
use crate::journal::Journal;
use crate::store::{Identity, Store, decode_checkpoint};
use crate::{from_hex, hex};

/// What was exported.
#[derive(Debug)]
pub struct Exported {
    pub round: u64,
    pub sha3_512: String,
    pub tensors: usize,
}

/// How to use the file, in words, for the task: what goes in and what comes out.
fn preprocessing(task: &model::Task, images: Option<&model::ImageShape>) -> String {
    let input = match images {
        Some(i) => format!(
            "image = the file converted to {} channel(s) ({}), resized to {} x {} (bilinear), \
             pixels / 255 in channel-major order (cohort.inputs); input = (image - \
             preprocess.mean) / preprocess.std, in float64; output = the CNN of \
             cohort.model_spec (convs.N: PyTorch Conv2d weights, stride 1, no padding; \
             denses.N: nn.Linear weights)",
            i.channels,
            if i.channels == 1 { "grayscale" } else { "RGB" },
            i.height,
            i.width
        ),
        None => "input = (value - preprocess.mean) / preprocess.std, in float64, in the order of \
         cohort.inputs; a categorical column becomes one input per level but the first \
         (1 when the value equals the level, else 0); a missing value becomes 0 after \
         standardisation (schema missing = impute_mean) or drops the row (drop_row); \
         output = model(input), layers in order with ReLU between them"
            .to_string(),
    };
    let output = match task {
        model::Task::Binary { greater_than, .. } => format!(
            "probability = sigmoid(output[0]); the positive class is label > {greater_than}"
        ),
        model::Task::Multiclass { .. } => {
            "class probabilities = softmax(output); output[i] is cohort.class_names[i] \
             (the task's classes in order)"
                .to_string()
        }
        model::Task::Regression {
            loss: model::RegressionLoss::Poisson,
            ..
        } => "prediction = exp(output[0]) (a rate; the model predicts its log)".to_string(),
        model::Task::Regression {
            standardise: true, ..
        } => "prediction = output[0] * preprocess.label[1] + preprocess.label[0], in the label's units"
            .to_string(),
        model::Task::Regression { .. } => "prediction = output[0], in the label's units".to_string(),
    };
    format!("{input}; {output}")
}

/// Rounds whose checkpoint file is still on disk (older ones are pruned).
fn kept_rounds(dir: &Path, last: u64) -> Vec<u64> {
    (0..=last)
        .filter(|r| Store::checkpoint_file(dir, *r).exists())
        .collect()
}

pub fn export_model(
    config: &CoordinatorConfig,
    round: Option<u64>,
    out: &Path,
) -> Result<Exported> {
    let ca_der = crate::tls::first_cert_der(&config.tls.ca_cert)?;
    let spec = config.model.spec();
    let identity = Identity::of(&ca_der, config);
    let dir = &config.data_dir;
    if !Store::check_marker(dir, &identity)? {
        bail!(
            "{} holds no Cohort run (no {}): nothing to export",
            dir.display(),
            crate::store::MARKER
        );
    }
    let journal = Journal::read(dir).context("reading the round journal")?;
    let (Some(last), Some((setup, _))) = (journal.last_round(), journal.setup()) else {
        bail!(
            "the data directory holds no committed round yet (round 0 is committed once the feature statistics are)"
        );
    };
    let round = round.unwrap_or(last);
    let Some(entry) = journal.entry(round) else {
        bail!("round {round} is not committed yet; the last committed round is {last}");
    };
    let committed = entry.checkpoint();
    let path = Store::checkpoint_file(dir, round);
    let params = match std::fs::read(&path) {
        Ok(bytes) => {
            let c = decode_checkpoint(round, &bytes)?;
            if !committed.sha3_512.is_empty() && hex(&c.sha3_512) != committed.sha3_512 {
                bail!(
                    "{} is not the checkpoint committed for round {round}",
                    path.display()
                );
            }
            c.params
        }
        // The initial model is a function of model.seed: rebuilt, then checked against what
        // was committed, so `--round 0` works after its checkpoint was pruned.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && round == 0 => {
            let params = config.model.initial().map_err(|e| anyhow::anyhow!(e))?;
            if hex(&model::params_sha3_512(&params)) != committed.sha3_512 {
                bail!(
                    "the checkpoint of round 0 was pruned and the model rebuilt from model.seed = {} is not the one committed: was the seed changed?",
                    config.model.seed
                );
            }
            params
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no checkpoint of round {round}; kept: {:?} (see storage.keep_checkpoints)",
                kept_rounds(dir, last)
            );
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let sha3 = model::params_sha3_512(&params);
    let key = crate::signing_key(&config.tls.key)?.verifying_key();
    let signature = from_hex(&committed.signature).unwrap_or_default();
    if !model::verify_model(&key, &sha3, &signature) {
        bail!("checkpoint {round} is not signed by this coordinator's key: refusing to export it");
    }
    let inputs = match config.schema.declared_inputs() {
        Some(names) => names.context("the configuration's [schema]")?,
        None => (0..spec.inputs).map(|i| format!("input{i}")).collect(),
    };
    let task = &config.schema.task;
    let columns = spec.inputs + usize::from(task.standardises_label());
    if inputs.len() != spec.inputs || setup.mean.len() != columns || setup.std.len() != columns {
        bail!(
            "the schema gives {} inputs and the committed statistics {} columns, the model has {} inputs{}",
            inputs.len(),
            setup.mean.len(),
            spec.inputs,
            if task.standardises_label() {
                " (and the label)"
            } else {
                ""
            }
        );
    }

    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = spec
        .pytorch_tensors(&params)?
        .into_iter()
        .map(|(name, shape, values)| {
            let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, Dtype::F32, shape, raw)
        })
        .collect();
    let mut preprocess = vec![
        ("preprocess.mean", setup.mean[..spec.inputs].to_vec()),
        ("preprocess.std", setup.std[..spec.inputs].to_vec()),
    ];
    if task.standardises_label() {
        preprocess.push((
            "preprocess.label",
            vec![setup.mean[spec.inputs], setup.std[spec.inputs]],
        ));
    }
    for (name, values) in preprocess {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name.into(), Dtype::F64, vec![values.len()], raw));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, raw)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), raw)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let hash = hex(&sha3);
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("cohort.round".to_string(), round.to_string()),
        ("cohort.model".to_string(), spec.describe()),
        (
            "cohort.model_spec".to_string(),
            serde_json::to_string(&spec)?,
        ),
        ("cohort.sha3_512".to_string(), hash.clone()),
        ("cohort.signature".to_string(), committed.signature.clone()),
        ("cohort.inputs".to_string(), serde_json::to_string(&inputs)?),
        (
            "cohort.schema".to_string(),
            serde_json::to_string(&config.schema)?,
        ),
        (
            "cohort.task".to_string(),
            serde_json::to_string(&task.to_table())?,
        ),
        (
            "cohort.class_names".to_string(),
            serde_json::to_string(&task.class_names())?,
        ),
        (
            "cohort.preprocessing".to_string(),
            preprocessing(task, config.schema.images.as_ref()),
        ),
        (
            "cohort.images".to_string(),
            serde_json::to_string(&config.schema.images)?,
        ),
    ]);
    let n = views.len();
    let data = safetensors::tensor::serialize(views, Some(metadata))?;
    // Written beside the target and renamed, so a crash never leaves half a file behind.
    let tmp = out.with_extension("safetensors.partial");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(Exported {
        round,
        sha3_512: hash,
        tensors: n,
    })
}
