//! What `classify`, `caption` and `vqa` share: the method and smoothing flags, the dissection
//! table, the progress of the perturbation methods and the JSON of one map.

use std::path::Path;

use anyhow::Context;
use gradcam_core::render::Rendered;
use gradcam_core::{Cam, CamMethod, EigenSmooth, Explainable, Explanation, Method, NeuronReport, UnitNames};
use gradcam_neurons::Dissection;
use indicatif::ProgressBar;
use serde::Serialize;

/// The method flags every explaining command takes.
#[derive(clap::Args, Clone)]
pub struct MethodArgs {
    /// CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ablationcam or
    /// scorecam (one forward pass of the network per channel of the layer), guided-backprop or
    /// guided-gradcam (images at the input's resolution). Several, comma-separated, also write a
    /// comparison of them.
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
    /// The explainer of `model` with these flags; Ablation-CAM and Score-CAM report to `bar`.
    pub fn cam<'m, M: Explainable + ?Sized>(&self, model: &'m M, bar: &'m Progress) -> Cam<'m, M> {
        Cam::new(model).eigen_smooth(self.eigen_smooth).aug_smooth(self.aug_smooth).on_progress(&bar.0)
    }

    /// The method an `--eval` run scores: one whose map comes from the gradients, with
    /// eigen-smoothing if asked.
    pub fn eval_method(&self) -> anyhow::Result<Box<dyn CamMethod>> {
        let [method] = self.method[..] else { anyhow::bail!("--eval scores one method at a time; --method names {}", self.method.len()) };
        if self.aug_smooth {
            anyhow::bail!("--eval does not take --aug-smooth");
        }
        let m = method.cam_method().filter(|_| method.is_gradient_map()).with_context(|| format!("--eval scores the gradient-based methods, not {method}"))?;
        Ok(if self.eigen_smooth { Box::new(EigenSmooth(m)) } else { m })
    }
}

/// A gradient-based method's name, checked (for commands that score maps).
pub fn parse_gradient_method(s: &str) -> Result<Method, String> {
    let m: Method = s.parse().map_err(|e: gradcam_core::UnknownMethod| e.to_string())?;
    if !m.is_gradient_map() {
        return Err(format!("{m} is not one of the gradient-based methods (gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam)"));
    }
    Ok(m)
}

/// The progress bar of Ablation-CAM and Score-CAM over the layer's channels: (done, channels).
pub struct Progress(pub Box<dyn Fn(usize, usize) + Sync>);

impl Progress {
    /// A bar on stderr, or none when `quiet`.
    pub fn new(quiet: bool) -> Self {
        if quiet {
            return Progress(Box::new(|_, _| ()));
        }
        let bar = ProgressBar::hidden();
        bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} channels [{elapsed_precise}<{eta_precise}]").expect("valid template"));
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        Progress(Box::new(move |done, k| {
            bar.set_length(k as u64);
            bar.set_position(done as u64);
            if done >= k {
                bar.finish_and_clear();
                bar.reset();
            }
        }))
    }
}

/// The dissection table: `--dissection`, else the model folder's `dissection.json` if any;
/// `required` turns a missing default into an error that says how to make one.
pub fn load_dissection(explicit: Option<&Path>, model: &Path, required: bool) -> anyhow::Result<Option<Dissection>> {
    if let Some(p) = explicit {
        return Ok(Some(Dissection::load(p)?));
    }
    let default = model.join("dissection.json");
    if default.exists() {
        return Ok(Some(Dissection::load(&default)?));
    }
    if required {
        anyhow::bail!("{} has no dissection.json; make one with `gradcam dissect --model {} --data DATA` or pass --dissection FILE", model.display(), model.display());
    }
    Ok(None)
}

/// The neuron report of an explanation by a dissection table's names.
pub fn dissection_report<'a>(names: &'a UnitNames<'a>) -> impl Fn(&Explanation, &str) -> gradcam_core::Result<NeuronReport> + 'a {
    move |e, subject| e.neurons(names, subject).ok_or_else(|| gradcam_core::Error::Unsupported(format!("{} gives no weights to report", e.method)))
}

/// One map as every command's `--json` reports it.
#[derive(Serialize)]
pub struct MapJson {
    pub method: &'static str,
    pub counterfactual: bool,
    pub score: f32,
    pub cam_size: [usize; 2],
    pub cam: Vec<Vec<f32>>,
    /// False when the map is zero everywhere: nothing in the layer supports the target.
    pub nonzero: bool,
    pub overlay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neurons: Option<NeuronReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl MapJson {
    pub fn new(r: &Rendered) -> Self {
        let e = &r.explanation;
        MapJson {
            method: e.method.name(),
            counterfactual: e.is_counterfactual(),
            score: e.score,
            cam_size: [e.map_size.0, e.map_size.1],
            cam: e.cam().rows(),
            nonzero: e.nonzero(),
            overlay: r.file.display().to_string(),
            text: r.neurons.as_ref().map(|n| n.text.clone()),
            neurons: r.neurons.clone(),
        }
    }

    /// "Grad-CAM for", "gradcam++ for", "counterfactual (gradcam) for": how text output
    /// introduces the map.
    pub fn kind(&self) -> String {
        match (self.counterfactual, self.method) {
            (true, m) => format!("counterfactual ({m}) for"),
            (false, "gradcam") => "Grad-CAM for".to_string(),
            (false, m) => format!("{m} for"),
        }
    }
}
