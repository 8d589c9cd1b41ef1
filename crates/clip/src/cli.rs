//! The flags of `gradcam match` that say what to match (feature `cli`).

use std::path::PathBuf;

/// The model, the texts and what to explain of them.
#[derive(clap::Args, Debug, Clone)]
pub struct MatchFlags {
    /// Images to match.
    #[arg(required_unless_present = "inputs")]
    pub images: Vec<PathBuf>,
    /// CLIP model folder: a trained one (`gradcam train clip`) or an ONNX pair (scripts/export_clip.py).
    #[arg(long, default_value = "models/clip")]
    pub model: PathBuf,
    /// A text to match with each image; repeatable.
    #[arg(long = "text", required = true)]
    pub texts: Vec<String>,
    /// The image tower's value to explain (default: the last block's attention input).
    #[arg(long)]
    pub layer: Option<String>,
    /// Explain CLIP's zero-shot probability of each text among the texts (softmax over 100 x
    /// cosine; two or more texts) instead of its cosine similarity.
    #[arg(long)]
    pub softmax: bool,
    /// Also write the counterfactual maps (what argues against each text).
    #[arg(long)]
    pub counterfactual: bool,
}

/// The flags of `gradcam train clip` beyond the ones every trainer takes.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    #[arg(long, default_value_t = crate::train::TrainConfig::default().settings.epochs)]
    pub epochs: usize,
    /// Share of training texts that are object phrases ("red circle"); the rest are captions.
    #[arg(long, default_value_t = crate::train::TrainConfig::default().phrase_share)]
    pub phrase_share: f64,
    /// Weight of the phrase loss (each image against every colour-shape phrase; 0 = off).
    #[arg(long, default_value_t = crate::train::TrainConfig::default().phrase_loss)]
    pub phrase_loss: f64,
}
