//! VGG-16 (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
//! Recognition", 2015), the Grad-CAM paper's model, with torchvision parameter names
//! (`features.N`, `classifier.N`). Every module of `features` is its own named layer, so the
//! paper's relu5_3 (`features.29`, 512 x 14 x 14 at 224, the default) can be explained.

use candle_core::Tensor;
use gradcam_kernels::{Activation, AdaptiveAvgPool2d, Linear, MaxPool2d, Padding, Rule};

use crate::network::{conv, linear, Layer, Network};
use crate::weights::Weights;
use crate::Result;

/// Channels per conv layer, `0` for a max-pool (torchvision's configuration "D").
const CONFIG: [usize; 18] = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];

struct Classifier {
    fc6: Linear,
    fc7: Linear,
    fc8: Linear,
}

impl Layer for Classifier {
    fn forward(&self, x: &Tensor, rule: Rule) -> candle_core::Result<Tensor> {
        let x = AdaptiveAvgPool2d { out_h: 7, out_w: 7 }.forward(x)?.flatten_from(1)?; // [b, 25088]
        // Dropout is the identity at inference.
        let x = self.fc6.forward_with(&x, rule)?; // [b, 4096]
        let x = self.fc7.forward_with(&x, rule)?; // [b, 4096]
        self.fc8.forward_with(&x, rule) // [b, classes]
    }
}

/// A classifier layer under its torchvision name, or under timm's (`timm/vgg16.tv_in1k` stores
/// fc6 and fc7 as 7x7 and 1x1 convolutions, which at 224 px are the same linear maps).
fn classifier_layer(w: &Weights, torchvision: &str, timm: &str, timm_shape: &[usize], act: Activation) -> Result<Linear> {
    let (out, inp) = (timm_shape[0], timm_shape[1..].iter().product());
    if w.contains(&format!("{timm}.weight")) && !w.contains(&format!("{torchvision}.weight")) {
        let weight = w.get(&format!("{timm}.weight"), timm_shape)?.reshape((out, inp))?;
        let bias = w.get(&format!("{timm}.bias"), &[out])?;
        return Ok(Linear::new(&weight, Some(&bias), act)?);
    }
    linear(w, torchvision, out, inp, act)
}

/// Builds VGG-16 (without batch norm). Layers `features.0` .. `features.30`.
pub fn vgg16(w: &Weights, num_classes: usize) -> Result<Network> {
    let mut layers: Vec<(String, Box<dyn Layer>)> = Vec::new();
    let mut cin = 3;
    // Each convolution with its ReLU, for passes that run through both.
    let mut fused = Vec::new();
    for cout in CONFIG {
        let i = layers.len();
        if cout == 0 {
            let pool = MaxPool2d { kernel: 2, stride: 2, padding: 0 };
            layers.push((format!("features.{i}"), Box::new(move |x: &Tensor, _: Rule| pool.forward(x))));
        } else {
            let c = conv(w, &format!("features.{i}"), [cout, cin, 3, 3], 1, Padding::Symmetric(1), Activation::Identity)?;
            fused.push((i, c.with_activation(Activation::Relu)?));
            layers.push((format!("features.{i}"), Box::new(c)));
            layers.push((format!("features.{}", i + 1), Box::new(|x: &Tensor, rule: Rule| Activation::Relu.forward_with(x, rule))));
            cin = cout;
        }
    }
    let classifier = Classifier {
        fc6: classifier_layer(w, "classifier.0", "pre_logits.fc1", &[4096, 512, 7, 7], Activation::Relu)?,
        fc7: classifier_layer(w, "classifier.3", "pre_logits.fc2", &[4096, 4096, 1, 1], Activation::Relu)?,
        fc8: classifier_layer(w, "classifier.6", "head.fc", &[num_classes, 4096], Activation::Identity)?,
    };
    let net = Network::new("vgg16", layers, Box::new(classifier), "features.29", num_classes);
    Ok(fused.into_iter().fold(net, |net, (i, c)| net.with_fused(i, Box::new(c))))
}
