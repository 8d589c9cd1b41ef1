//! The paper's dataset-bias experiment (section 6.3) and its trust test (section 5.2) on
//! ShapeScenes, where the object and the spurious cue are known to the pixel (`gradcam demo
//! bias`): a biased training set (a corner mark whose colour goes with the class), a balanced
//! one of the same images (the mark's colour independent of the class), a model trained on
//! each, and Grad-CAM showing which of the two looks at the object.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Serialize;

use crate::card::{accuracy, cases, Case};
use crate::train::{train, Event, TrainConfig};
use crate::{Config, Error, Result};
use gradcam_scenes::scene::{Bias, CueKind, SHAPES};

/// What the demo runs.
#[derive(Debug, Clone, Serialize)]
pub struct DemoConfig {
    pub seed: u64,
    /// Scenes in each of the two datasets (train, val and test together).
    pub scenes: usize,
    /// Fractions of train, val and test.
    pub fractions: [f64; 3],
    /// The biased set's probability that the cue has its own class's colour (train and val).
    pub p: f64,
    pub train: TrainConfig,
    /// Rows of `grid.png`.
    pub grid_rows: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { seed: 0, scenes: 5000, fractions: [0.8, 0.1, 0.1], p: 1.0, train: TrainConfig { settings: gradcam_train::Settings { epochs: 8, ..TrainConfig::default().settings }, ..Default::default() }, grid_rows: 8 }
    }
}

/// One model's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    /// Accuracy on its own validation split (same distribution as its training data).
    pub val_accuracy: f64,
    /// Accuracy on the unbiased test split (the cue has the class's colour half of the time).
    pub test_accuracy: f64,
    /// Share of test images with a cue where the Grad-CAM map of the predicted class peaks on it.
    pub cue_peak_rate: f64,
    /// Mean share of the map's mass inside the labelled object's box.
    pub object_energy_share: f64,
    /// Test accuracy where the cue has the class's colour, and where it has another's.
    pub test_accuracy_cue_agrees: f64,
    pub test_accuracy_cue_disagrees: f64,
    pub model: PathBuf,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub biased: ModelFigures,
    pub balanced: ModelFigures,
    /// Among test images both models classify correctly, the share where the balanced model's
    /// map puts more of its mass on the object than the biased model's.
    pub trust_rate: f64,
    pub agreeing_cases: usize,
    pub test_images: usize,
    /// The textual explanation (section 7) of each model's prediction on the grid's first image:
    /// `conv4`'s units named by network dissection on the model's validation split.
    pub neurons: Neurons,
    pub config: DemoConfig,
    pub seconds: f64,
    pub data: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Neurons {
    pub image: String,
    pub biased: String,
    pub balanced: String,
}

/// What the progress callback hears.
pub enum Stage<'a> {
    /// A stage starts: its name and how many units of work it has.
    Begin(&'a str, usize),
    /// Units of work done in the current stage.
    Done(usize),
    /// A training event of the current model.
    Train(Event<'a>),
}

/// Runs the experiment into `out`: `data/{biased,balanced}` (ShapeScenes with `--bias
/// mark:P` and `mark:balanced`, same seed, so the same scenes up to the mark's colour),
/// `models/{biased,balanced}`, `report.json`, `report.md` and `grid.png`.
/// The report's figures as text (what `gradcam demo bias` prints).
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = |m: &ModelFigures| format!("val {:.3}, test {:.3}, cue peak rate {:.3}, object share {:.3}", m.val_accuracy, m.test_accuracy, m.cue_peak_rate, m.object_energy_share);
        writeln!(f, "biased:   {}\nbalanced: {}", m(&self.biased), m(&self.balanced))?;
        writeln!(f, "trust rate {:.3} over {} agreeing cases; {:.1} min", self.trust_rate, self.agreeing_cases, self.seconds / 60.0)
    }
}

pub fn run(out: &Path, cfg: &DemoConfig, progress: &mut dyn FnMut(Stage)) -> Result<Report> {
    if !(0.0..=1.0).contains(&cfg.p) {
        return Err(Error::Data(format!("the biased probability {} is outside [0, 1]", cfg.p)));
    }
    if !(10..=gradcam_scenes::dataset::MAX_SCENES).contains(&cfg.scenes) {
        return Err(Error::Data(format!("{} scenes: give 10 to {}", cfg.scenes, gradcam_scenes::dataset::MAX_SCENES)));
    }
    cfg.train.check()?;
    let start = std::time::Instant::now();
    gradcam_io::create_dir_all(out)?;
    let data = out.join("data");
    let mut figures = Vec::new();
    let mut all_cases = Vec::new();
    let mut dissections = Vec::new();
    let mut nets = Vec::new();
    for (name, p) in [("biased", cfg.p), ("balanced", Bias::balanced_p())] {
        let dir = data.join(name);
        progress(Stage::Begin(&format!("{name} scenes"), cfg.scenes));
        let scenes = gradcam_scenes::Config { n: cfg.scenes, seed: cfg.seed, fractions: cfg.fractions, size: cfg.train.image_size.clamp(64, 128), bias: Some(Bias { cue: CueKind::Mark, p }) };
        gradcam_scenes::dataset::write(&dir, &scenes, &|| {})?;
        progress(Stage::Done(cfg.scenes));
        let model = out.join("models").join(name);
        progress(Stage::Begin(&format!("training the {name} model"), cfg.train.settings.epochs));
        let tc = TrainConfig { settings: gradcam_train::Settings { seed: cfg.seed, ..cfg.train.settings }, ..cfg.train.clone() };
        let ckpt = train(&dir, &model, &tc, false, &mut |e| progress(Stage::Train(e)))?;
        let minutes = ckpt.log.iter().map(|l| l.seconds).sum::<f64>() / 60.0;
        crate::card::write(&dir, &model, &ckpt, minutes, &|_, _| {})?;
        let net = crate::load(&model)?;
        let model_cfg = Config::load(&model)?;
        // Both models are tested on the biased set's test split (identical to the balanced set's).
        let test = gradcam_scenes::Split::read(&data.join("biased").join("test"))?;
        let n = test.instances.images.len();
        progress(Stage::Begin(&format!("explaining the {name} model's test predictions"), n));
        let cs = cases(&net, &model_cfg, &test, n, &mut |d, _| progress(Stage::Done(d)))?;
        if cs.is_empty() {
            return Err(Error::Data("the test split has no labelled images; give more scenes".into()));
        }
        progress(Stage::Begin(&format!("dissecting the {name} model's conv4"), 1));
        let dissection = gradcam_neurons::dissect_model(&model, &dir.join("val"), 1000, gradcam_neurons::Options::default(), &|_, _| {})?;
        dissection.save(&model.join("dissection.json"))?;
        dissections.push(dissection);
        let val_accuracy = ckpt.log.last().map_or(0.0, |l| l.metrics.val_accuracy);
        figures.push(figures_of(&cs, &model_cfg, val_accuracy, model));
        nets.push(net);
        all_cases.push(cs);
    }
    let (balanced_cases, biased_cases) = (all_cases.pop().expect("two"), all_cases.pop().expect("two"));
    let agreeing: Vec<(&Case, &Case)> = biased_cases.iter().zip(&balanced_cases).filter(|(a, b)| a.correct() && b.correct()).collect();
    let trusted = agreeing.iter().filter(|(a, b)| b.object_share > a.object_share).count();
    let (balanced, biased) = (figures.pop().expect("two"), figures.pop().expect("two"));
    let rows = grid_rows(&biased_cases, cfg.grid_rows);
    let first = rows.first().copied().unwrap_or(0);
    let neurons = Neurons {
        image: biased_cases[first].file.clone(),
        biased: neuron_text(&nets[0], &dissections[0], &data.join("biased/test/images").join(&biased_cases[first].file), biased_cases[first].predicted)?,
        balanced: neuron_text(&nets[1], &dissections[1], &data.join("biased/test/images").join(&balanced_cases[first].file), balanced_cases[first].predicted)?,
    };
    let report = Report {
        biased,
        balanced,
        trust_rate: trusted as f64 / agreeing.len().max(1) as f64,
        agreeing_cases: agreeing.len(),
        test_images: biased_cases.len(),
        neurons,
        config: cfg.clone(),
        seconds: start.elapsed().as_secs_f64(),
        data: data.clone(),
    };
    let grid = grid(&data.join("biased").join("test").join("images"), &rows, &biased_cases, &balanced_cases)?;
    gradcam_io::write_png(&grid, &out.join("grid.png"))?;
    let json = serde_json::to_string_pretty(&report)?;
    gradcam_io::write_atomic(&out.join("report.json"), json.as_bytes())?;
    let md = markdown(&report, &rows, &biased_cases, &balanced_cases);
    gradcam_io::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(report)
}

/// The neuron report of `net`'s Grad-CAM for `class` on one image, units named by `dissection`.
fn neuron_text(net: &gradcam_encoders::Network, dissection: &gradcam_neurons::Dissection, image: &Path, class: usize) -> Result<String> {
    let img = gradcam_encoders::preprocess::load_image(image)?;
    let input = gradcam_encoders::preprocess::prepare_with(&img, gradcam_encoders::preprocess::Resize::Stretch, net.preprocess())?.tensor;
    let split = net.split(net.layer_index(net.default_layer())?);
    let e = gradcam_core::Cam::new(&split).explain(&input, &[gradcam_core::Target::class(class)])?.remove(0);
    let names = gradcam_core::UnitNames::Dissection(dissection);
    Ok(e.neurons(&names, &net.label(class)).map(|r| r.text).unwrap_or_default())
}

fn figures_of(cs: &[Case], cfg: &Config, val_accuracy: f64, model: PathBuf) -> ModelFigures {
    let with_cue: Vec<&Case> = cs.iter().filter(|c| c.cue.is_some()).collect();
    let peaks = with_cue.iter().filter(|c| c.peaks_on_cue() == Some(true)).count();
    let agrees = |c: &&Case| c.cue.is_some_and(|(_, k)| k == c.label);
    let acc = |v: Vec<&Case>| v.iter().filter(|c| c.correct()).count() as f64 / v.len().max(1) as f64;
    ModelFigures {
        val_accuracy,
        test_accuracy: accuracy(cs, &cfg.labels).accuracy,
        cue_peak_rate: peaks as f64 / with_cue.len().max(1) as f64,
        object_energy_share: cs.iter().map(|c| c.object_share).sum::<f64>() / cs.len().max(1) as f64,
        test_accuracy_cue_agrees: acc(cs.iter().filter(agrees).collect()),
        test_accuracy_cue_disagrees: acc(cs.iter().filter(|c| c.cue.is_some() && !agrees(c)).collect()),
        model,
    }
}

/// The grid's test images: alternately one whose cue has another class's colour and one whose
/// cue has its own, in test order.
fn grid_rows(cases: &[Case], n: usize) -> Vec<usize> {
    let disagree: Vec<usize> = (0..cases.len()).filter(|&i| cases[i].cue.is_some_and(|(_, k)| k != cases[i].label)).collect();
    let agree: Vec<usize> = (0..cases.len()).filter(|&i| cases[i].cue.is_some_and(|(_, k)| k == cases[i].label)).collect();
    let mut rows = Vec::new();
    let (mut a, mut d) = (agree.into_iter(), disagree.into_iter());
    while rows.len() < n {
        match (d.next(), a.next()) {
            (None, None) => break,
            (x, y) => rows.extend(x.into_iter().chain(y).take(n - rows.len())),
        }
    }
    rows
}

const CELL: u32 = 128;

/// Rows of (image, biased model's map, balanced model's map), each 128 px, 4 px apart.
fn grid(images: &Path, rows: &[usize], biased: &[Case], balanced: &[Case]) -> Result<RgbImage> {
    let gap = 4;
    let mut out = RgbImage::from_pixel(3 * CELL + 2 * gap, (rows.len() as u32 * (CELL + gap)).saturating_sub(gap).max(1), image::Rgb([255, 255, 255]));
    for (r, &i) in rows.iter().enumerate() {
        let img = gradcam_encoders::preprocess::load_image(&images.join(&biased[i].file))?;
        let region = gradcam_core::map::Region { x: 0, y: 0, width: img.width(), height: img.height() };
        let panels = [img.clone(), gradcam_core::map::overlay(&img, &biased[i].map.normalized().0, region), gradcam_core::map::overlay(&img, &balanced[i].map.normalized().0, region)];
        for (c, p) in panels.iter().enumerate() {
            let p = image::imageops::resize(p, CELL, CELL, image::imageops::FilterType::Nearest);
            image::imageops::replace(&mut out, &p, (c as u32 * (CELL + gap)) as i64, (r as u32 * (CELL + gap)) as i64);
        }
    }
    Ok(out)
}

fn markdown(r: &Report, rows: &[usize], biased: &[Case], balanced: &[Case]) -> String {
    let c = &r.config;
    let mut s = String::from("# Dataset bias: what Grad-CAM shows about a biased model\n\n");
    s.push_str(&format!(
        "Two scene classifiers (circle / square / triangle) trained on the same {} ShapeScenes images (seed {}), which differ only in a 9-pixel mark in a corner: in the **biased** set the mark's colour goes with the class (cyan: circle, orange: square, pink: triangle) in {:.0}% of training and validation images; in the **balanced** set it is independent of the class. Both are tested on the same unbiased test split ({} images), where the mark has the class's colour half of the time.\n\n",
        c.scenes, c.seed, c.p * 100.0, r.test_images
    ));
    s.push_str("| | biased | balanced |\n|---|---|---|\n");
    let row = |name: &str, f: fn(&ModelFigures) -> f64| format!("| {name} | {:.3} | {:.3} |\n", f(&r.biased), f(&r.balanced));
    s.push_str(&row("validation accuracy (own distribution)", |f| f.val_accuracy));
    s.push_str(&row("test accuracy (unbiased)", |f| f.test_accuracy));
    s.push_str(&row("test accuracy, mark has the class's colour", |f| f.test_accuracy_cue_agrees));
    s.push_str(&row("test accuracy, mark has another class's colour", |f| f.test_accuracy_cue_disagrees));
    s.push_str(&row("Grad-CAM peaks on the mark (cue_peak_rate)", |f| f.cue_peak_rate));
    s.push_str(&row("share of the map inside the object's box", |f| f.object_energy_share));
    s.push_str(&format!(
        "\n**Trust (section 5.2):** on the {} test images both models classify correctly, the balanced model's map puts more of its mass on the object than the biased model's in **{:.1}%** of cases: the explanation tells the better model apart where their answers do not.\n\n",
        r.agreeing_cases, r.trust_rate * 100.0
    ));
    s.push_str(&format!(
        "**Textual explanations (section 7)** of the first row's image ({}), `conv4`'s units named by network dissection on each model's validation split (`models/*/dissection.json`):\n\n- biased: {}\n- balanced: {}\n\n",
        r.neurons.image, r.neurons.biased, r.neurons.balanced
    ));
    s.push_str("`grid.png`: each row is a test image, then the Grad-CAM map of the biased model's predicted class, then the balanced model's.\n\n| row | image | class | mark colour | biased predicts | balanced predicts |\n|---|---|---|---|---|---|\n");
    for (k, &i) in rows.iter().enumerate() {
        let (a, b) = (&biased[i], &balanced[i]);
        let mark = a.cue.map_or("-", |(_, k)| gradcam_scenes::scene::CUE_COLORS.get(k).copied().unwrap_or("?"));
        let name = |k: usize| SHAPES.get(k).copied().unwrap_or("?");
        s.push_str(&format!("| {} | {} | {} | {mark} | {} | {} |\n", k + 1, a.file, name(a.label), name(a.predicted), name(b.predicted)));
    }
    s.push_str(&format!(
        "\nReproduce: `gradcam demo bias --out DIR --seed {}` ({:.1} min here). Data in `{}`, models (with their cards) in `models/`.\n",
        c.seed,
        r.seconds / 60.0,
        r.data.display()
    ));
    s
}
