//! EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
//! Networks", 2019; the Lite variants of the TensorFlow TPU repository): EfficientNet-B0 without
//! squeeze-and-excitation, with ReLU6, batch-norm eps 1e-3 and TensorFlow "SAME" padding.
//!
//! Parameter names follow lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._expand_conv`,
//! `_conv_head`, `_fc`), as in `efficientnet-lite0-57934424.pth`.

use candle_core::Tensor;
use gradcam_kernels::{Activation, Conv2d, Linear, Padding, Rule};

use crate::network::{conv_bn, global_avg_pool, linear, Layer, Network};
use crate::weights::Weights;
use crate::Result;

const BN_EPS: f64 = 1e-3;

/// (repeats, kernel, first stride, expand ratio, in, out) per stage, as in EfficientNet-B0.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, identity skip when the
/// shape is kept.
pub struct MbConvBlock {
    expand: Option<Conv2d>,
    depthwise: Conv2d,
    project: Conv2d,
    skip: bool,
}

impl MbConvBlock {
    fn new(w: &Weights, prefix: &str, kernel: usize, stride: usize, expand_ratio: usize, cin: usize, cout: usize) -> Result<Self> {
        let hidden = cin * expand_ratio;
        let expand = if expand_ratio != 1 {
            Some(conv_bn(w, &format!("{prefix}._expand_conv"), &format!("{prefix}._bn0"), [hidden, cin, 1, 1], 1, 1, Padding::Same, BN_EPS, Activation::Relu6)?)
        } else {
            None
        };
        let depthwise = conv_bn(
            w,
            &format!("{prefix}._depthwise_conv"),
            &format!("{prefix}._bn1"),
            [hidden, 1, kernel, kernel],
            hidden,
            stride,
            Padding::Same,
            BN_EPS,
            Activation::Relu6,
        )?;
        let project = conv_bn(w, &format!("{prefix}._project_conv"), &format!("{prefix}._bn2"), [cout, hidden, 1, 1], 1, 1, Padding::Same, BN_EPS, Activation::Identity)?;
        Ok(Self { expand, depthwise, project, skip: stride == 1 && cin == cout })
    }
}

impl Layer for MbConvBlock {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward_with(x, rule)?, // [b, hidden, h, w]
            None => x.clone(),
        };
        let h = self.depthwise.forward_with(&h, rule)?; // [b, hidden, h / s, w / s]
        // [b, out, h / s, w / s], the skip connection added in the projection's epilogue
        if self.skip {
            self.project.forward_residual_with(&h, x, Activation::Identity, rule)
        } else {
            self.project.forward_with(&h, rule)
        }
    }
}

struct Classifier {
    fc: Linear,
}

impl Layer for Classifier {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        self.fc.forward_with(&global_avg_pool(x)?, rule) // [b, classes]
    }
}

/// Builds EfficientNet-Lite0. Layers: `_conv_stem`, `_blocks.0` .. `_blocks.15`, `_conv_head`
/// (the head activation relu6(bn1(conv_head(x))), 1280 x 7 x 7 at 224: the default).
pub fn efficientnet_lite0(w: &Weights, num_classes: usize) -> Result<Network> {
    let mut layers: Vec<(String, Box<dyn Layer>)> = Vec::new();
    let stem = conv_bn(w, "_conv_stem", "_bn0", [32, 3, 3, 3], 1, 2, Padding::Same, BN_EPS, Activation::Relu6)?;
    layers.push(("_conv_stem".into(), Box::new(stem)));
    let mut index = 0;
    for (repeats, kernel, stride, expand, cin, cout) in STAGES {
        for r in 0..repeats {
            let (s, i) = if r == 0 { (stride, cin) } else { (1, cout) };
            let prefix = format!("_blocks.{index}");
            layers.push((prefix.clone(), Box::new(MbConvBlock::new(w, &prefix, kernel, s, expand, i, cout)?)));
            index += 1;
        }
    }
    let head = conv_bn(w, "_conv_head", "_bn1", [1280, 320, 1, 1], 1, 1, Padding::Same, BN_EPS, Activation::Relu6)?;
    layers.push(("_conv_head".into(), Box::new(head)));
    let fc = linear(w, "_fc", num_classes, 1280, Activation::Identity)?;
    Ok(Network::new("efficientnet-lite0", layers, Box::new(Classifier { fc }), "_conv_head", num_classes).with_batch_chunks())
}
