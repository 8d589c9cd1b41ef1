//! `gradcam serve`'s flags and start-up: which models to load, the limits, the address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gradcam_encoders::onnx::OnnxOptions;
use gradcam_encoders::{ModelKind, ModelName};

use crate::{App, Classifier, Clip, Limits, Models, Named};

/// `gradcam serve`: the explorer page and its JSON API.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on; anything but a loopback address exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Captioner folder (`none` to leave it out).
    #[arg(long, default_value = "models/captioner")]
    pub caption_model: PathBuf,
    /// VQA model folder (`none` to leave it out).
    #[arg(long, default_value = "models/vqa")]
    pub vqa_model: PathBuf,
    /// Classifier: efficientnet-lite0, vgg16, resnet18, resnet50, an ONNX file (FILE.onnx, at
    /// its default layer), a folder made by `gradcam train classifier`, or none.
    #[arg(long, default_value = "efficientnet-lite0")]
    pub classifier: String,
    /// Classifier weights (see `gradcam classify --help`).
    #[arg(long)]
    pub weights: Option<String>,
    /// CLIP model folder for image-text matching: a trained one (`gradcam train clip`) or an
    /// ONNX pair (scripts/export_clip.py); `none` to leave it out.
    #[arg(long, default_value = "models/clip")]
    pub clip_model: PathBuf,
    /// Requests explained at once.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Requests that may wait for a worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Largest upload, MiB (more: 413).
    #[arg(long, default_value_t = 20)]
    pub max_upload_mb: usize,
    /// Seconds a request may take from arrival to answer (more: 504, and its work is stopped).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Connections open at once; more are answered 503 and closed.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds for a request's head to arrive, and the longest pause in its body (then 408 and the
    /// connection closed: a client sending a byte a second is disconnected).
    #[arg(long, default_value_t = 10)]
    pub read_timeout: u64,
}

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A model named on the command line did not load.
    #[error("{what} {path}: {message}")]
    Model {
        /// Which model.
        what: &'static str,
        /// From where.
        path: String,
        /// Why not.
        message: String,
    },
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
    /// The address could not be served.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A model folder: `None` for `none`, and for the shipped default when it is absent (with a note).
fn folder<'a>(path: &'a Path, default: &str, what: &str) -> Option<&'a Path> {
    if path.as_os_str() == "none" {
        return None;
    }
    if path == Path::new(default) && !path.join("config.json").exists() {
        eprintln!("note: no {what} at {default} (run from the repository, or pass the folder); serving without it");
        return None;
    }
    Some(path)
}

fn dissection(dir: &Path) -> Option<gradcam_neurons::Dissection> {
    gradcam_neurons::Dissection::load(&dir.join("dissection.json")).ok()
}

/// Loads the models the flags name.
pub fn load(args: &ServeArgs) -> Result<Models, StartError> {
    // Each cause once, the reason included (a bare `to_string` dropped it: "captioner DIR: DIR/config.json").
    let fail = |what, path: &Path, e: &(dyn std::error::Error + 'static)| StartError::Model { what, path: path.display().to_string(), message: gradcam_core::chain_message(e, &|_| None) };
    let mut models = Models::default();
    if let Some(dir) = folder(&args.caption_model, "models/captioner", "captioner") {
        let model = gradcam_captioner::Captioner::load(dir).map_err(|e| fail("captioner", dir, &e))?;
        models.captioner = Some(Named { model, dissection: dissection(dir) });
    }
    if let Some(dir) = folder(&args.vqa_model, "models/vqa", "VQA model") {
        let model = gradcam_vqa::Vqa::load(dir).map_err(|e| fail("VQA model", dir, &e))?;
        models.vqa = Some(Named { model, dissection: dissection(dir) });
    }
    if args.classifier != "none" {
        let name: ModelName = args.classifier.parse().map_err(|e: gradcam_encoders::Error| StartError::Usage(e.to_string()))?;
        match name.load(args.weights.as_deref(), &OnnxOptions::default(), None) {
            Ok((net, layer)) => models.classifier = Some(Classifier { net, layer }),
            // The default classifier is optional: its weights may not be installed.
            Err(e) if args.weights.is_none() && name == ModelName::Builtin(ModelKind::EfficientNetLite0) => eprintln!("note: serving without a classifier: {e}"),
            Err(e) => return Err(fail("classifier", Path::new(&args.classifier), &e)),
        }
    }
    if let Some(dir) = folder(&args.clip_model, "models/clip", "CLIP model") {
        let model = gradcam_clip::Matcher::load(dir).map_err(|e| fail("CLIP model", dir, &e))?;
        let layer = model.with_image(None, |_, name| name.to_string()).map_err(|e| fail("CLIP model", dir, &e))?;
        models.clip = Some(Clip { model, path: dir.to_path_buf(), layer });
    }
    if models.captioner.is_none() && models.vqa.is_none() && models.classifier.is_none() && models.clip.is_none() {
        return Err(StartError::Usage("no model to serve: give --caption-model, --vqa-model, --classifier or --clip-model".into()));
    }
    Ok(models)
}

/// Loads the models, binds the address, prints it (`listening on http://ADDR/` on stdout) and
/// serves until Ctrl-C.
pub fn run(args: &ServeArgs) -> Result<(), StartError> {
    // Ranges a service can honour: a day's timeout, uploads a decoder takes, a queue of waiting
    // requests held in memory (the extremes overflowed: a worker panicked on `--timeout 2^64-1`,
    // `--max-upload-mb 2^44` became a limit of 0 bytes, `--queue` at its maximum refused every request).
    let flags = [("--workers", args.workers as u64, 256), ("--max-upload-mb", args.max_upload_mb as u64, 4096), ("--timeout", args.timeout, 86_400), ("--max-connections", args.max_connections as u64, 65_536), ("--read-timeout", args.read_timeout, 3600)];
    for (flag, value, most) in flags {
        if !(1..=most).contains(&value) {
            return Err(StartError::Usage(format!("{flag} {value}: give 1 to {most}")));
        }
    }
    if args.queue > 100_000 {
        return Err(StartError::Usage(format!("--queue {}: give 0 to 100000", args.queue)));
    }
    let models = load(args)?;
    let limits = Limits {
        workers: args.workers,
        queue: args.queue,
        max_upload: args.max_upload_mb << 20,
        timeout: Duration::from_secs(args.timeout),
        max_connections: args.max_connections,
        read_timeout: Duration::from_secs(args.read_timeout),
    };
    let app = App::new(models, limits);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(args.host, args.port)).await?;
        let addr = listener.local_addr()?;
        if crate::is_public(&addr) {
            eprintln!("warning: listening on {addr}, reachable from other machines; anyone who can reach it can use this machine's CPU");
        }
        let m = &app.models;
        let names: Vec<&str> = [m.captioner.as_ref().map(|_| "captioner"), m.vqa.as_ref().map(|_| "vqa"), m.classifier.as_ref().map(|c| c.net.arch()), m.clip.as_ref().map(|_| "clip")].into_iter().flatten().collect();
        println!("listening on http://{addr}/ ({}); Ctrl-C stops", names.join(", "));
        crate::serve(listener, app).await
    })?;
    Ok(())
}

/// `--html FILE`: the explorer's view of each result as one self-contained page.
#[derive(clap::Args, Default)]
pub struct HtmlArg {
    /// Also write the explorer's view of the result as one self-contained HTML file (images
    /// inline), to share without a server; with several images, FILE then FILE_STEM.html.
    #[arg(long)]
    html: Option<std::path::PathBuf>,
    #[arg(skip)]
    written: std::cell::Cell<bool>,
}

impl HtmlArg {
    /// Writes the page of `record` (image `stem` at `image`) when asked for.
    pub fn write(&self, stem: &str, image: &Path, view: crate::html::View, record: &impl serde::Serialize) -> std::io::Result<()> {
        let Some(file) = &self.html else { return Ok(()) };
        let file = crate::html::file_for(file, stem, !self.written.replace(true));
        crate::html::write(&file, image, view, record).map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", file.display())))
    }
}
