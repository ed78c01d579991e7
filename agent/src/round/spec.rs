//! The model a round announces, as this site's data reads it.

use anyhow::{Context, Result, anyhow, bail};
use cohort_proto::v1::RoundStart;
use cohort_protocols::model::{self, DataSchema, ModelSpec, TrainingConfig};

use crate::site::LocalSite;

/// The model of `start` over this site's inputs and outputs. The family is implied by the
/// parameter count: logistic regression has inputs + 1 parameters; anything else is
/// described by the training settings, which name a custom model or a CNN when the
/// coordinator runs one. A count that does not match is a schema mismatch, named.
pub(super) fn model_spec(
    data: &dyn LocalSite,
    schema: Option<&DataSchema>,
    start: &RoundStart,
) -> Result<ModelSpec> {
    let params = start.model_bytes as usize / 4;
    let cfg: TrainingConfig =
        toml::from_str(&start.training_toml).context("the coordinator's [training] table")?;
    if let Some(name) = cfg.custom {
        // Which custom model, and whether this site has it, is the site's model's check.
        return Ok(ModelSpec {
            kind: model::ModelKind::Custom,
            inputs: data.inputs(),
            hidden: Vec::new(),
            outputs: data.outputs(),
            custom: Some(model::CustomSpec {
                name,
                parameters: params,
            }),
            cnn: None,
        });
    }
    if let Some(layers) = cfg.cnn {
        let input = schema.and_then(|s| s.images).ok_or_else(|| {
            anyhow!("the coordinator's model is a CNN but the schema has no images")
        })?;
        let spec = ModelSpec {
            kind: model::ModelKind::Cnn,
            inputs: data.inputs(),
            hidden: Vec::new(),
            outputs: data.outputs(),
            custom: None,
            cnn: Some(model::cnn::CnnSpec { input, layers }),
        };
        if spec.num_params() != params {
            bail!(
                "the coordinator's CNN has {params} parameters, its declaration gives {} here: do the schemas match?",
                spec.num_params()
            );
        }
        return Ok(spec);
    }
    let hidden = cfg.hidden.clone();
    let kind = if hidden.is_empty() {
        model::ModelKind::Logreg
    } else {
        model::ModelKind::Mlp
    };
    let spec = ModelSpec {
        kind,
        inputs: data.inputs(),
        hidden,
        outputs: data.outputs(),
        custom: None,
        cnn: None,
    };
    if spec.num_params() != params {
        bail!(
            "the coordinator's model has {params} parameters but this site's data gives {} inputs ({} parameters): do the schemas match?",
            data.inputs(),
            spec.num_params()
        );
    }
    Ok(spec)
}
