//! Grad-CAM visual explanations (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
//! Networks via Gradient-based Localization") for any [candle](https://github.com/huggingface/candle)
//! CNN, for an LSTM image captioner word by word, and for the answers of a VQA model.
//!
//! Split your model at the layer you explain: `features` runs the input up to that layer's
//! activations A (`[n, K, h, w]`), `head` runs the rest from A to the scores. That is all: the
//! backward runs through the head only, and every [`Method`] (Grad-CAM, Grad-CAM++, HiResCAM,
//! XGrad-CAM, LayerCAM, EigenCAM, Ablation-CAM, Score-CAM, Guided Backpropagation, Guided
//! Grad-CAM) works on it.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use gradcam::{Cam, Method, Split, Target};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A small CNN of your own: conv -> ReLU (the explained layer) -> global average pool -> linear.
//! let varmap = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv"))?;
//! let fc = candle_nn::linear(8, 10, vb.pp("fc"))?;
//! let model = Split::new(
//!     |x: &Tensor| gradcam::ops::Activation::Relu.forward(&conv.forward(x)?), // [n, 8, 30, 30]
//!     |a: &Tensor| fc.forward(&a.mean((2, 3))?),                               // [n, 10]
//! );
//!
//! let image = Tensor::rand(0f32, 1f32, (1, 3, 32, 32), &Device::Cpu)?;
//! let maps = Cam::new(&model).method(Method::GradCamPlusPlus).explain(&image, &[Target::class(3), Target::class(3).counterfactual()])?;
//! assert_eq!(maps[0].map_size, (30, 30));
//! assert_eq!(maps[0].weights.as_ref().map(Vec::len), Some(8)); // alpha_k, one per channel
//! # Ok(())
//! # }
//! ```
//!
//! A method of your own is an [`Explainer`] (or, for a map from the activations and their
//! gradients, a [`CamMethod`]): `Cam::new(&model).method(MyMethod)` runs it through the same
//! pipeline as the built-in ones (`examples/custom_method.rs`).
//!
//! The root holds what explaining a model takes; the rest is grouped by purpose: [`models`]
//! (the ImageNet backbones, ONNX models, the shipped captioner and VQA model, which implement
//! [`Explainable`] themselves), [`methods`] (the methods as types), [`ops`] (differentiable CPU
//! ops for your own models), [`map`], [`report`] (neuron reports and network dissection),
//! [`data`] (datasets), [`eval`] (the paper's evaluations), [`io`] (files written whole or not
//! at all) and [`pipeline`], which does for one image what the `gradcam` command-line tool does
//! (predictions, maps, overlays, neuron reports, JSON records).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bench;
pub mod pipeline;

pub use gradcam_core::{
    AnyMethod, Cam, CamMethod, Context, Error, Explainable, Explainer, Explanation, Layout, Map, Method, Request, Result, Rule, Score, Split, Target, UnknownMethod,
};

/// Differentiable CPU ops whose backward is exact (or, built with [`Rule::Guided`], follows
/// Guided Backpropagation's rule), for the models you explain.
pub mod ops {
    pub use gradcam_kernels::{matmul, matvec, softmax_last, tap, Activation, AdaptiveAvgPool2d, Conv2d, GlobalAvgMaxPool, Linear, LstmCell, MaxPool2d, Padding, Pointwise, Rule, TrainableConv2d};
}

/// Every built-in method as a type, and the pieces they are made of: [`explain`](methods::explain)
/// (the one backward pass through the head), the guided images, the smoothings, and the
/// transformers' attention rollout and relevance.
pub mod methods {
    pub use gradcam_core::attention::{record as record_attention, Attention, Relevance, Rollout, ScoreFn};
    pub use gradcam_core::AttentionForward;
    pub use gradcam_core::guided::{gradient_image, guided_backprop, guided_gradcam, Guided};
    pub use gradcam_core::methods::{AugSmooth, EigenCam, EigenSmooth, GradCamPlusPlus, HiResCam, LayerCam, XGradCam};
    pub use gradcam_core::perturbation::{AblationCam, ScoreCam};
    pub use gradcam_core::{explain, weighted_sum, GradCam, GuidedForward, NoGuidedForward};
}

/// Maps: resizing, normalisation, the jet colormap, overlays.
pub mod map {
    pub use gradcam_core::map::{jet, overlay, Map, Region};
}

/// Neuron reports (the paper's textual explanations) and network dissection (names for units).
pub mod report {
    pub use gradcam_core::report::{class_named_report, report, Neuron, NeuronReport, UnitNames, UnitTable};
    pub use gradcam_neurons::{dissect, dissect_model, Concept, Dissection, UnitName};
}

/// The models: ImageNet CNNs with named layers and their weights, ONNX classifiers, the scene
/// classifiers, the captioner and the VQA model this project trains, and how images become their
/// inputs.
pub mod models {
    pub use gradcam_captioner::{Caption, CaptionSplit, Captioner};
    pub use gradcam_encoders::imagenet::{class_name as imagenet_class, class_names as imagenet_classes};
    pub use gradcam_encoders::onnx::{OnnxModel, OnnxOptions};
    pub use gradcam_encoders::preprocess::{decode_image, load_image, prepare, prepare_with, Prepared, Preprocess, Resize};
    pub use gradcam_encoders::scene_classifier::load as load_scene_classifier;
    pub use gradcam_encoders::{Error, ModelKind, Network, Split as NetworkSplit, Weights, WeightsSource};
    pub use gradcam_vqa::{Question, Vqa, VqaSplit};
    pub use gradcam_clip::{Matcher, Matching, OnnxPair, Probability, Trained as TrainedClip, VisionSplit as ClipVisionSplit, LOGIT_SCALE};
}

/// Datasets: ShapeScenes (synthetic scenes with masks, captions and questions) and the COCO /
/// VQA v2 readers and writers.
pub mod data {
    pub use gradcam_scenes::coco::{Instance, Instances};
    pub use gradcam_scenes::rle::Mask;
    pub use gradcam_scenes::{Config as ScenesConfig, Error, Example, Split as DatasetSplit};
}

/// The paper's evaluations as one protocol over classifiers, the captioner and the VQA model,
/// and the metrics they tally.
pub mod eval {
    pub use gradcam_core::metrics::{auc, energy, pixel_order, spearman, threshold_box, BoundingBox, Energy, Pointing};
    pub use gradcam_eval::{run, Error, Options, Summary, Task, Tolerance};
}

/// Files written whole or not at all.
pub mod io {
    pub use gradcam_io::{npy_bytes, remove_temporaries_on_signals, write_atomic, write_atomic_with, write_npy, write_png, write_safetensors, Error};
}
