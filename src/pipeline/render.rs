//! The per-image loop written once, for every front end (the CLI's `classify`, `caption` and
//! `vqa`, the examples): every method for every target of one image, each explanation pictured,
//! written as a PNG under one naming rule and, if asked, reported as text; and the strips that
//! put them side by side.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;

use gradcam_core::map::Region;
use gradcam_core::report::NeuronReport;
use gradcam_core::{Cam, Explainable, Explanation, Method, Target};
use gradcam_core::Result;

/// Writes a picture, as a core error (the pipeline's callers see one error type per step).
fn write_png_atomic(image: &RgbImage, path: &Path) -> Result<()> {
    gradcam_io::write_png(image, path).map_err(|e| gradcam_core::Error::Write(Box::new(e)))
}

/// One thing to explain on an image: its target and its name (`tabby`, `red`, the word
/// `circle`), which reports use and, after `file_prefix`, file names.
#[derive(Debug, Clone)]
pub struct Subject {
    /// What to explain.
    pub target: Target,
    /// The class, word or answer, as people read it.
    pub name: String,
    /// What comes before the name in file names (`281` for a class, `03` for a word's step).
    pub file_prefix: String,
}

impl Subject {
    /// A subject named `name`.
    pub fn new(target: Target, name: impl Into<String>) -> Self {
        Subject { target, name: name.into(), file_prefix: String::new() }
    }

    /// The same subject with `prefix` before its name in file names.
    pub fn file_prefix(self, prefix: impl Into<String>) -> Self {
        Subject { file_prefix: prefix.into(), ..self }
    }

    /// This subject, followed by its counterfactual when `counterfactual` is set.
    pub fn and_counterfactual(self, counterfactual: bool) -> Vec<Subject> {
        let cf = counterfactual.then(|| Subject { target: self.target.clone().counterfactual(), ..self.clone() });
        std::iter::once(self).chain(cf).collect()
    }

    /// The subject of the neuron report's sentence: the name, or "not NAME" for a
    /// counterfactual.
    pub fn report_subject(&self) -> String {
        if self.target.is_counterfactual() {
            format!("not {}", self.name)
        } else {
            self.name.clone()
        }
    }

    /// The file name of this subject's picture by `tag` (method and smoothing):
    /// `STEM[_PREFIX]_NAME[_counterfactual]TAG.png`, every part sanitised.
    pub fn file_name(&self, stem: &str, tag: &str) -> String {
        let cf = if self.target.is_counterfactual() { "_counterfactual" } else { "" };
        let prefix = match sanitize(&self.file_prefix) {
            p if p.is_empty() => String::new(),
            p => format!("{p}_"),
        };
        format!("{stem}_{prefix}{}{cf}{tag}.png", sanitize(&self.name))
    }
}

/// Largest side of the pictures drawn on an image: the maps have tens of cells a side, so a larger
/// picture shows nothing more and costs memory (a strip of a caption's words over an 8000-pixel
/// photo would take gigabytes).
pub const MAX_PICTURE_SIDE: u32 = 1024;

/// `image` scaled down to fit [`MAX_PICTURE_SIDE`] (borrowed when it fits already), and `region`
/// scaled with it: what the pictures are drawn on.
pub fn fit(image: &RgbImage, region: Region) -> (std::borrow::Cow<'_, RgbImage>, Region) {
    let (w, h) = image.dimensions();
    if w.max(h) <= MAX_PICTURE_SIDE {
        return (std::borrow::Cow::Borrowed(image), region);
    }
    let scale = MAX_PICTURE_SIDE as f64 / w.max(h) as f64;
    let px = |v: u32| ((v as f64 * scale).round() as u32).max(1);
    let small = image::imageops::resize(image, px(w), px(h), image::imageops::FilterType::Triangle);
    let (sw, sh) = small.dimensions();
    let x = px(region.x).min(sw - 1);
    let y = px(region.y).min(sh - 1);
    let region = Region { x, y, width: px(region.width).min(sw - x), height: px(region.height).min(sh - y) };
    (std::borrow::Cow::Owned(small), region)
}

/// Where and on what the pictures of one image go.
pub struct Output<'a> {
    /// The folder written to; `None` keeps the pictures in memory only (a server's responses).
    pub dir: Option<&'a Path>,
    /// The image's unique stem ([`Stems::unique`]).
    pub stem: &'a str,
    /// The original image.
    pub image: &'a RgbImage,
    /// The part of it the model saw.
    pub region: Region,
    /// Neither write nor keep the pictures (see [`crate::pipeline::Files::discard`]).
    pub discard: bool,
}

/// The neuron report of an explanation of a subject (given its report subject, e.g. "not red").
pub type Neurons<'a> = &'a dyn Fn(&Explanation, &str) -> Result<NeuronReport>;

/// One explanation, its picture and the file it was written to.
pub struct Rendered {
    /// The explanation.
    pub explanation: Explanation,
    /// Its picture: the overlay, or the guided image.
    pub picture: RgbImage,
    /// Where the picture was written (`None` when kept in memory).
    pub file: Option<PathBuf>,
    /// Its textual explanation, when asked for.
    pub neurons: Option<NeuronReport>,
    /// The picture is not kept (nor written).
    pub discarded: bool,
}

/// Every method's explanation of every subject of one image, pictured and written:
/// `result[method][subject]`. `activations` are the model's features of `input` (`[1, ...]`).
pub fn render<M: Explainable + ?Sized>(
    cam: &Cam<'_, M>,
    methods: &[Method],
    input: &Tensor,
    activations: &Tensor,
    subjects: &[Subject],
    out: &Output<'_>,
    neurons: Option<Neurons<'_>>,
) -> Result<Vec<Vec<Rendered>>> {
    let mut all = render_batch(cam, methods, input, activations, &[subjects.to_vec()], std::slice::from_ref(out), &[neurons])?;
    Ok(all.remove(0))
}

/// [`render`] for a batch: `input` and `activations` hold the images' rows, `subjects[i]`,
/// `outs[i]` and `neurons[i]` are image i's; one explanation call per method for all of them.
/// The answer's `[i]` is image i's, as [`render`] gives it.
pub fn render_batch<M: Explainable + ?Sized>(
    cam: &Cam<'_, M>,
    methods: &[Method],
    input: &Tensor,
    activations: &Tensor,
    subjects: &[Vec<Subject>],
    outs: &[Output<'_>],
    neurons: &[Option<Neurons<'_>>],
) -> Result<Vec<Vec<Vec<Rendered>>>> {
    let requests: Vec<(usize, Target)> = subjects.iter().enumerate().flat_map(|(i, ss)| ss.iter().map(move |s| (i, s.target.clone()))).collect();
    let mut all: Vec<Vec<Vec<Rendered>>> = subjects.iter().map(|_| Vec::with_capacity(methods.len())).collect();
    for &method in methods {
        let cam = cam.clone().method(method);
        let mut explanations = cam.explain_with(input, activations, &requests)?.into_iter();
        for (i, ss) in subjects.iter().enumerate() {
            let (out, mut row) = (&outs[i], Vec::with_capacity(ss.len()));
            for (explanation, subject) in explanations.by_ref().take(ss.len()).zip(ss) {
                let picture = explanation.picture(out.image, out.region)?;
                let file = out.dir.map(|dir| dir.join(subject.file_name(out.stem, &cam.file_tag())));
                if let Some(file) = &file {
                    write_png_atomic(&picture, file)?;
                }
                let neurons = neurons[i].map(|f| f(&explanation, &subject.report_subject())).transpose()?;
                row.push(Rendered { explanation, picture, file, neurons, discarded: out.discard });
            }
            all[i].push(row);
        }
    }
    Ok(all)
}

/// Writes, for each subject, the comparison strip of its pictures by every method
/// (`STEM[_PREFIX]_NAME[_counterfactual]_methods.png`, `height` px high) and returns the files
/// (none without a folder).
pub fn write_method_strips(rendered: &[Vec<Rendered>], subjects: &[Subject], out: &Output<'_>, height: u32) -> Result<Vec<PathBuf>> {
    let Some(dir) = out.dir else { return Ok(Vec::new()) };
    let mut files = Vec::with_capacity(subjects.len());
    for (i, subject) in subjects.iter().enumerate() {
        let panels: Vec<RgbImage> = rendered.iter().map(|row| row[i].picture.clone()).collect();
        let file = dir.join(subject.file_name(out.stem, "_methods"));
        write_png_atomic(&comparison_strip(&panels, height), &file)?;
        files.push(file);
    }
    Ok(files)
}

/// Pictures side by side, each scaled to `height` px, 4 px of white between them.
pub fn comparison_strip(panels: &[RgbImage], height: u32) -> RgbImage {
    let scaled: Vec<RgbImage> = panels
        .iter()
        .map(|p| {
            let w = ((p.width() as u64 * height as u64) / p.height().max(1) as u64).max(1) as u32;
            image::imageops::resize(p, w, height, image::imageops::FilterType::Triangle)
        })
        .collect();
    let width = scaled.iter().map(|p| p.width()).sum::<u32>() + 4 * scaled.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(width.max(1), height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for p in &scaled {
        image::imageops::replace(&mut out, p, x as i64, 0);
        x += p.width() + 4;
    }
    out
}

/// One row per method: the image followed by that method's picture of every subject (a caption's
/// words, left to right, each scaled to the image's size), the rows stacked.
pub fn grid(image: &RgbImage, rendered: &[Vec<Rendered>]) -> RgbImage {
    let (w, h) = image.dimensions();
    let cols = rendered.iter().map(Vec::len).max().unwrap_or(0) as u32 + 1;
    let mut out = RgbImage::new(w * cols, h * rendered.len().max(1) as u32);
    for (r, row) in rendered.iter().enumerate() {
        let y = (r as u32 * h) as i64;
        image::imageops::replace(&mut out, image, 0, y);
        for (i, item) in row.iter().enumerate() {
            let x = (w * (i as u32 + 1)) as i64;
            match item.picture.dimensions() == (w, h) {
                true => image::imageops::replace(&mut out, &item.picture, x, y),
                false => image::imageops::replace(&mut out, &image::imageops::resize(&item.picture, w, h, image::imageops::FilterType::Triangle), x, y),
            }
        }
    }
    out
}

/// The file stems of one run's images, made unique (`img`, `img-2`, ...) so that two inputs
/// with the same name never overwrite each other's outputs.
#[derive(Debug, Default)]
pub struct Stems(HashSet<String>);

impl Stems {
    /// The sanitised, unique stem of `path`.
    pub fn unique(&mut self, path: &Path) -> String {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let base = match sanitize(&name) {
            s if s.is_empty() => "image".to_string(),
            s => s,
        };
        let mut stem = base.clone();
        let mut n = 2;
        while !self.0.insert(stem.clone()) {
            stem = format!("{base}-{n}");
            n += 1;
        }
        stem
    }
}

/// Longest file-name part [`sanitize`] makes of a name (a label, a word, an image's stem): a
/// file name holds a stem, a subject and a method's tag, and file systems take 255 bytes.
pub const MAX_NAME_PART: usize = 64;

/// A file-name part: ASCII letters, digits and `-` kept, anything else `_`, no `_` at either end
/// (so no hidden files, separators, control or direction characters). A part longer than
/// [`MAX_NAME_PART`] is cut, and ends in a hash of the whole name, so that long names alike in
/// their first bytes still get files of their own.
pub fn sanitize(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let s = s.trim_matches('_');
    if s.len() <= MAX_NAME_PART {
        return s.to_string();
    }
    // FNV-1a, the same on every machine and in every version (unlike std's hasher).
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    // `s` is ASCII: any byte index is a character boundary.
    format!("{}-{:08x}", s[..MAX_NAME_PART - 9].trim_end_matches('_'), hash as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_and_kept_apart() {
        let long = |end: &str| format!("{}{end}", "é word ".repeat(700));
        let (a, b) = (sanitize(&long("a")), sanitize(&long("b")));
        assert!(a.len() <= MAX_NAME_PART && b.len() <= MAX_NAME_PART && a != b, "{a} {b}");
        assert!(a.starts_with("word___word___") && a[a.len() - 9..].starts_with('-'), "{a}");
        let file = Subject::new(Target::class(0), long("x")).file_prefix("0").file_name(&Stems::default().unique(Path::new(&format!("{}.png", "i".repeat(250)))), "_gradcampp_eigen_aug");
        assert!(file.len() <= 200, "{} bytes: {file}", file.len());
        assert_eq!(sanitize(&"x".repeat(MAX_NAME_PART)), "x".repeat(MAX_NAME_PART), "a name that fits is kept whole");
    }

    #[test]
    fn one_naming_rule_for_every_command() {
        let s = Subject::new(Target::class(281), "tabby, tabby cat").file_prefix("281");
        assert_eq!(s.file_name("cat", ""), "cat_281_tabby__tabby_cat.png");
        let cf = Subject::new(Target::answer(3).counterfactual(), "red").file_name("q1_scene", "_gradcampp");
        assert_eq!(cf, "q1_scene_red_counterfactual_gradcampp.png");
        let mut stems = Stems::default();
        assert_eq!(stems.unique(Path::new("a/img.png")), "img");
        assert_eq!(stems.unique(Path::new("b/img.png")), "img-2");
        assert_eq!(stems.unique(Path::new("x/.\u{202e}gnp.png")), "gnp");
        assert_eq!(stems.unique(Path::new("x/\n.png")), "image");
    }
}
