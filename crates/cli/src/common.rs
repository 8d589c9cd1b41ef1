//! What `classify`, `caption` and `vqa` share: the method and smoothing flags, the dissection
//! table and the progress bar of the perturbation methods.

use gradcam::pipeline::Settings;
use gradcam::Method;

/// The method flags every explaining command takes.
#[derive(clap::Args, Clone)]
pub struct MethodArgs {
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ablationcam or
    /// scorecam (one forward pass of the network per channel of the layer), guided-backprop or
    /// guided-gradcam (images at the input's resolution); for transformers rollout and relevance.
    /// Several, comma-separated, also write a comparison of them.
    #[arg(long, default_value = "gradcam", value_delimiter = ',')]
    pub method: Vec<Method>,
    /// Eigen-smoothing: each map is the first principal component of the weighted activations
    /// alpha_k A^k instead of their sum (pytorch-grad-cam's eigen_smooth).
    #[arg(long)]
    pub eigen_smooth: bool,
    /// Augmentation smoothing: each map is the mean over the input flipped or not and multiplied
    /// by 0.9, 1 and 1.1, at the input's resolution (pytorch-grad-cam's aug_smooth; 6x the work).
    #[arg(long)]
    pub aug_smooth: bool,
}

impl MethodArgs {
    pub fn settings(&self) -> Settings {
        Settings { methods: self.method.clone(), eigen_smooth: self.eigen_smooth, aug_smooth: self.aug_smooth, cancel: None }
    }
}

/// How a trained model folder's explanations are made, named and shared: the methods, the
/// textual explanations and their dissection table, the HTML page.
#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Add each explanation's textual explanation: the 5 units with the largest and the 5 with
    /// the smallest alpha_k, named by the model's dissection table.
    #[arg(long)]
    pub neurons: bool,
    /// Dissection table for --neurons (and caption's --eval) (default: MODEL/dissection.json when
    /// present).
    #[arg(long)]
    pub dissection: Option<std::path::PathBuf>,
    /// Several methods also draw a comparison of them (a row per method, a strip per answer).
    #[command(flatten)]
    pub methods: MethodArgs,
    #[command(flatten)]
    pub html: gradcam_serve::cli::HtmlArg,
}

/// Where an explaining command writes its pictures, and how it prints its records.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Folder for the pictures (overlays, strips, adversarial images).
    #[arg(long, default_value = "gradcam-out")]
    pub out: std::path::PathBuf,
    /// Print one JSON object per image or question (JSON Lines) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A count that must be at least 1 (`--limit`).
pub fn positive(s: &str) -> Result<usize, String> {
    s.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| format!("{s:?}: give a whole number of at least 1"))
}

/// A record as one line of JSON (`--json`) or as its text.
pub fn print<R: serde::Serialize + std::fmt::Display>(out: &mut impl std::io::Write, r: &R, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        return writeln!(out);
    }
    write!(out, "{r}")
}
