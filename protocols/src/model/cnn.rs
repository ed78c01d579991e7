//! A small convolutional network declared in TOML (`[model] kind = "cnn"`, `layers = [...]`).
//!
//! The declaration is walked once to check it and to know every parameter tensor's shape, so
//! the coordinator can count, initialise, hash and export the model without burn. The flat
//! layout is the one the agent's burn module walks: every convolution (weight
//! `[out, in, k, k]`, then bias) in order, then every dense layer (weight `[in, out]`, then
//! bias) in order, the output layer last. The output layer is not declared: its width is the
//! task's (one, or one per class), so the same declaration serves every task.

use serde::{Deserialize, Serialize};

use super::schema::ImageShape;

/// One declared layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// `channels` filters of `kernel` × `kernel`, stride 1, no padding.
    Conv2d {
        channels: usize,
        kernel: usize,
    },
    Relu,
    /// Max-pooling over `size` × `size` windows, stride `size`.
    MaxPool {
        size: usize,
    },
    /// Zeroes each value with probability `rate` while training (scaled to keep the mean).
    Dropout {
        rate: f64,
    },
    Flatten,
    Dense {
        units: usize,
    },
}

/// A network over images of `input` shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnSpec {
    pub input: ImageShape,
    pub layers: Vec<Layer>,
}

/// A parameter tensor of the flat layout: (name, canonical shape).
pub type TensorShape = (String, Vec<usize>);

#[derive(Debug, Clone, Copy)]
enum Shape {
    Image(usize, usize, usize),
    Flat(usize),
}

impl CnnSpec {
    /// The parameter tensors in flat-layout order, with the output layer of `outputs`, or what
    /// is wrong with the declaration (naming the layer).
    pub fn tensors(&self, outputs: usize) -> Result<Vec<TensorShape>, String> {
        let i = self.input;
        let mut shape = Shape::Image(i.channels, i.height, i.width);
        let (mut convs, mut denses) = (Vec::new(), Vec::new());
        for (n, layer) in self.layers.iter().enumerate() {
            let at = |what: String| format!("model.layers[{n}] ({layer:?}): {what}");
            shape = match (*layer).clone() {
                Layer::Conv2d { channels, kernel } => {
                    let Shape::Image(c, h, w) = shape else {
                        return Err(at(
                            "a convolution needs an image, not flattened values".into()
                        ));
                    };
                    if channels == 0 || kernel == 0 || kernel > h || kernel > w {
                        return Err(at(format!(
                            "channels and kernel must be at least 1 and the kernel at most the {h} × {w} input"
                        )));
                    }
                    let k = convs.len();
                    convs.push((
                        format!("convs.{k}.weight"),
                        vec![channels, c, kernel, kernel],
                    ));
                    convs.push((format!("convs.{k}.bias"), vec![channels]));
                    Shape::Image(channels, h - kernel + 1, w - kernel + 1)
                }
                Layer::MaxPool { size } => {
                    let Shape::Image(c, h, w) = shape else {
                        return Err(at("pooling needs an image, not flattened values".into()));
                    };
                    if size == 0 || size > h || size > w {
                        return Err(at(format!(
                            "size must be at least 1 and at most the {h} × {w} input"
                        )));
                    }
                    Shape::Image(c, h / size, w / size)
                }
                Layer::Relu => shape,
                Layer::Dropout { rate } => {
                    if !(0.0..1.0).contains(&rate) {
                        return Err(at("rate must be in [0, 1)".into()));
                    }
                    shape
                }
                Layer::Flatten => match shape {
                    Shape::Image(c, h, w) => Shape::Flat(c * h * w),
                    flat => flat,
                },
                Layer::Dense { units } => {
                    let Shape::Flat(n) = shape else {
                        return Err(at("a dense layer needs flattened values: add { type = \"flatten\" } before it".into()));
                    };
                    if units == 0 {
                        return Err(at("units must be at least 1".into()));
                    }
                    let k = denses.len() / 2;
                    denses.push((format!("denses.{k}.weight"), vec![n, units]));
                    denses.push((format!("denses.{k}.bias"), vec![units]));
                    Shape::Flat(units)
                }
            };
        }
        let n = match shape {
            Shape::Image(c, h, w) => c * h * w,
            Shape::Flat(n) => n,
        };
        let k = denses.len() / 2;
        denses.push((format!("denses.{k}.weight"), vec![n, outputs.max(1)]));
        denses.push((format!("denses.{k}.bias"), vec![outputs.max(1)]));
        convs.extend(denses);
        Ok(convs)
    }

    pub fn describe(&self) -> String {
        let i = self.input;
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| match l {
                Layer::Conv2d { channels, kernel } => format!("conv{channels}k{kernel}"),
                Layer::Relu => "relu".into(),
                Layer::MaxPool { size } => format!("pool{size}"),
                Layer::Dropout { rate } => format!("dropout{rate}"),
                Layer::Flatten => "flatten".into(),
                Layer::Dense { units } => format!("dense{units}"),
            })
            .collect();
        format!(
            "{}x{}x{} {}",
            i.channels,
            i.height,
            i.width,
            layers.join("-")
        )
    }
}

/// Fan-in of a parameter tensor for its initialisation scale: d_in of a dense weight
/// `[in, out]`, in·k·k of a convolution `[out, in, k, k]`; a bias takes its layer's.
pub(crate) fn fan_in(shapes: &[TensorShape], index: usize) -> usize {
    let weight = if shapes[index].0.ends_with(".bias") && index > 0 {
        &shapes[index - 1].1
    } else {
        &shapes[index].1
    };
    match weight.as_slice() {
        [_, rest @ ..] if weight.len() == 4 => rest.iter().product(),
        [d_in, _] => *d_in,
        _ => 1,
    }
    .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layers: &str) -> Result<CnnSpec, String> {
        #[derive(Deserialize)]
        struct L {
            layers: Vec<Layer>,
        }
        let l: L = toml::from_str(layers).map_err(|e| e.to_string())?;
        Ok(CnnSpec {
            input: ImageShape {
                channels: 1,
                height: 28,
                width: 28,
            },
            layers: l.layers,
        })
    }

    #[test]
    fn a_lenet_like_declaration_has_the_shapes_pytorch_would_give() {
        let s = spec(
            r#"layers = [
                { type = "conv2d", channels = 8, kernel = 5 }, { type = "relu" },
                { type = "max_pool", size = 2 }, { type = "dropout", rate = 0.25 },
                { type = "flatten" }, { type = "dense", units = 32 }, { type = "relu" },
            ]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = s.tensors(10).unwrap_or_else(|e| panic!("{e}"));
        // 28 - 5 + 1 = 24, pooled to 12: 8 × 12 × 12 = 1152 inputs to the dense layer.
        let shapes: Vec<Vec<usize>> = t.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![8, 1, 5, 5],
                vec![8],
                vec![1152, 32],
                vec![32],
                vec![32, 10],
                vec![10]
            ]
        );
        assert_eq!(t[4].0, "denses.1.weight");
        assert_eq!(fan_in(&t, 0), 25);
        assert_eq!(fan_in(&t, 1), 25);
        assert_eq!(fan_in(&t, 2), 1152);
        assert_eq!(
            s.describe(),
            "1x28x28 conv8k5-relu-pool2-dropout0.25-flatten-dense32-relu"
        );
    }

    #[test]
    fn impossible_declarations_name_the_layer() {
        for (layers, needle) in [
            (
                r#"layers = [{ type = "dense", units = 4 }]"#,
                "add { type = \"flatten\" }",
            ),
            (
                r#"layers = [{ type = "flatten" }, { type = "conv2d", channels = 4, kernel = 3 }]"#,
                "model.layers[1]",
            ),
            (
                r#"layers = [{ type = "conv2d", channels = 4, kernel = 30 }]"#,
                "at most the 28 × 28 input",
            ),
            (r#"layers = [{ type = "dropout", rate = 1.0 }]"#, "[0, 1)"),
        ] {
            let err = spec(layers).and_then(|s| s.tensors(2)).unwrap_err();
            assert!(err.contains(needle), "{layers}: {err}");
        }
        assert!(spec(r#"layers = [{ type = "conv3d" }]"#).is_err());
    }
}
