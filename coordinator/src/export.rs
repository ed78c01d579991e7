//! `cohort-coordinator export-model`: a checkpoint as a safetensors file for PyTorch.
//!
//! The checkpoint is read from the data directory (whose marker must match the
//! configuration), its hash and signature are checked, and the parameters are written in
//! PyTorch's layout (`nn.Sequential` names, `[d_out, d_in]` weights) with the round, the
//! SHA3-512 of Cohort's flat parameter vector and the coordinator's signature as metadata.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cohort_protocols::model;
use safetensors::tensor::{Dtype, TensorView};

use crate::config::CoordinatorConfig;
use crate::hex;
use crate::store::{Identity, Store};

/// What was exported.
#[derive(Debug)]
pub struct Exported {
    pub round: u64,
    pub sha3_512: String,
    pub tensors: usize,
}

pub fn export_model(
    config: &CoordinatorConfig,
    round: Option<u64>,
    out: &Path,
) -> Result<Exported> {
    let ca_der = crate::tls::first_cert_der(&config.tls.ca_cert)?;
    let spec = config.model.spec();
    let identity = Identity::new(&ca_der, spec.describe(), config.schema.hash());
    if !config.data_dir.join(crate::store::MARKER).exists() {
        bail!(
            "{} holds no Cohort run (no {}): nothing to export",
            config.data_dir.display(),
            crate::store::MARKER
        );
    }
    let store = Store::open(&config.data_dir, &identity)?;
    let available = store.checkpoint_rounds()?;
    let round = match round.or(available.last().copied()) {
        Some(r) => r,
        None => bail!("the data directory holds no checkpoint yet"),
    };
    let Some(ckpt) = store.checkpoint(round)? else {
        bail!("no checkpoint of round {round}; kept: {available:?} (see storage.keep_checkpoints)");
    };
    let key = crate::signing_key(&config.tls.key)?.verifying_key();
    if !model::verify_model(&key, &ckpt.sha3_512, &ckpt.signature) {
        bail!("checkpoint {round} is not signed by this coordinator's key: refusing to export it");
    }
    let tensors = spec.pytorch_tensors(&ckpt.params)?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, raw)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), raw)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let hash = hex(&ckpt.sha3_512);
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("cohort.round".to_string(), round.to_string()),
        ("cohort.model".to_string(), spec.describe()),
        ("cohort.sha3_512".to_string(), hash.clone()),
        ("cohort.signature".to_string(), hex(&ckpt.signature)),
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
