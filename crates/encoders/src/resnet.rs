//! ResNet-18 and ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", 2016), with
//! torchvision parameter names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`).
//! Batch norms are folded into their convolutions at load time (inference only).

use candle_core::Tensor;
use gradcam_kernels::{Activation, Conv2d, Linear, MaxPool2d, Padding, Rule};

use crate::network::{conv_bn, global_avg_pool, linear, Layer, Network};
use crate::weights::Weights;
use crate::Result;

const BN_EPS: f64 = 1e-5;

/// ResNet-18/34's block: two 3x3 convolutions.
pub struct BasicBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    downsample: Option<Conv2d>,
}

/// ResNet-50's block: 1x1 reduce, 3x3 (carrying the stride, torchvision's "v1.5"), 1x1 expand.
pub struct Bottleneck {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    downsample: Option<Conv2d>,
}

fn downsample(w: &Weights, prefix: &str, cin: usize, cout: usize, stride: usize) -> Result<Option<Conv2d>> {
    if stride == 1 && cin == cout {
        return Ok(None);
    }
    let conv = conv_bn(w, &format!("{prefix}.downsample.0"), &format!("{prefix}.downsample.1"), [cout, cin, 1, 1], 1, stride, Padding::Symmetric(0), BN_EPS, Activation::Identity)?;
    Ok(Some(conv))
}

impl BasicBlock {
    fn new(w: &Weights, prefix: &str, cin: usize, planes: usize, stride: usize) -> Result<Self> {
        let p = |n: &str| format!("{prefix}.{n}");
        Ok(Self {
            conv1: conv_bn(w, &p("conv1"), &p("bn1"), [planes, cin, 3, 3], 1, stride, Padding::Symmetric(1), BN_EPS, Activation::Relu)?,
            conv2: conv_bn(w, &p("conv2"), &p("bn2"), [planes, planes, 3, 3], 1, 1, Padding::Symmetric(1), BN_EPS, Activation::Identity)?,
            downsample: downsample(w, prefix, cin, planes, stride)?,
        })
    }
}

impl Bottleneck {
    fn new(w: &Weights, prefix: &str, cin: usize, planes: usize, stride: usize) -> Result<Self> {
        let p = |n: &str| format!("{prefix}.{n}");
        let out = planes * 4;
        Ok(Self {
            conv1: conv_bn(w, &p("conv1"), &p("bn1"), [planes, cin, 1, 1], 1, 1, Padding::Symmetric(0), BN_EPS, Activation::Relu)?,
            conv2: conv_bn(w, &p("conv2"), &p("bn2"), [planes, planes, 3, 3], 1, stride, Padding::Symmetric(1), BN_EPS, Activation::Relu)?,
            conv3: conv_bn(w, &p("conv3"), &p("bn3"), [out, planes, 1, 1], 1, 1, Padding::Symmetric(0), BN_EPS, Activation::Identity)?,
            downsample: downsample(w, prefix, cin, out, stride)?,
        })
    }
}

/// The skip connection: the block's input, or its downsampling.
fn identity(x: &Tensor, downsample: &Option<Conv2d>) -> candle_core::Result<Tensor> {
    match downsample {
        Some(d) => d.forward(x),
        None => Ok(x.clone()),
    }
}

impl Layer for BasicBlock {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        // relu(conv2(.) + identity), the sum in conv2's epilogue: [b, planes, h / s, w / s]
        self.conv2.forward_residual_with(&self.conv1.forward_with(x, rule)?, &identity(x, &self.downsample)?, Activation::Relu, rule)
    }
}

impl Layer for Bottleneck {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        // relu(conv3(.) + identity), the sum in conv3's epilogue: [b, 4 planes, h / s, w / s]
        let h = self.conv2.forward_with(&self.conv1.forward_with(x, rule)?, rule)?;
        self.conv3.forward_residual_with(&h, &identity(x, &self.downsample)?, Activation::Relu, rule)
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

fn resnet(w: &Weights, arch: &'static str, blocks: [usize; 4], bottleneck: bool, num_classes: usize) -> Result<Network> {
    let mut layers: Vec<(String, Box<dyn Layer>)> = Vec::new();
    let stem = conv_bn(w, "conv1", "bn1", [64, 3, 7, 7], 1, 2, Padding::Symmetric(3), BN_EPS, Activation::Relu)?;
    layers.push(("relu".into(), Box::new(stem)));
    let pool = MaxPool2d { kernel: 3, stride: 2, padding: 1 };
    layers.push(("maxpool".into(), Box::new(move |x: &Tensor, _: Rule| pool.forward(x))));
    let expansion = if bottleneck { 4 } else { 1 };
    let mut cin = 64;
    let mut aliases = Vec::new();
    for (stage, &n) in blocks.iter().enumerate() {
        let planes = 64 << stage;
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let name = format!("layer{}.{b}", stage + 1);
            let block: Box<dyn Layer> = if bottleneck {
                Box::new(Bottleneck::new(w, &name, cin, planes, stride)?)
            } else {
                Box::new(BasicBlock::new(w, &name, cin, planes, stride)?)
            };
            layers.push((name.clone(), block));
            cin = planes * expansion;
            if b == n - 1 {
                aliases.push((format!("layer{}", stage + 1), name));
            }
        }
    }
    let fc = linear(w, "fc", num_classes, cin, Activation::Identity)?;
    let last = aliases.last().map(|(_, l)| l.clone()).unwrap_or_default();
    let mut net = Network::new(arch, layers, Box::new(Classifier { fc }), &last, num_classes);
    for (alias, layer) in aliases {
        net = net.with_alias(&alias, &layer);
    }
    Ok(net)
}

/// ResNet-18. Layers: `relu` (stem), `maxpool`, `layer1.0` .. `layer4.1` (aliases `layer1` ..
/// `layer4` for the last block of each stage); default `layer4.1`.
pub fn resnet18(w: &Weights, num_classes: usize) -> Result<Network> {
    resnet(w, "resnet18", [2, 2, 2, 2], false, num_classes)
}

/// ResNet-50, named as [`resnet18`]; default `layer4.2`.
pub fn resnet50(w: &Weights, num_classes: usize) -> Result<Network> {
    resnet(w, "resnet50", [3, 4, 6, 3], true, num_classes)
}
