//! The API's handlers: each reads a multipart form (the image is the field `image`), runs the
//! library's pipeline for one image in the work queue and answers its record as the CLI's
//! `--json` prints it, with the pictures as PNG data URLs instead of file names.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use http_body_util::BodyExt;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gradcam::pipeline::{caption, classify, matching, vqa, Files, Settings};
use gradcam::report::UnitNames;
use gradcam::Method;
use image::RgbImage;

use crate::{ApiError, App, Limits, Ticket, MAX_ANSWER, MIN_BODY_RATE, SAMPLES};

/// A request's form: the image's bytes and name, and the text fields (each name's values in the
/// order sent).
#[derive(Default)]
struct Form {
    image: Option<(String, Vec<u8>)>,
    fields: HashMap<String, Vec<String>>,
}

impl Form {
    /// Reads the request's multipart form, at most `limits.max_upload` bytes, kept only when
    /// `keep` (a request refused as busy is read and dropped). A larger body is read on (up to
    /// 4x the limit) and dropped, so that the client, still sending, hears the 413 instead of a
    /// reset connection; beyond that the connection is closed. The body must keep coming: no
    /// pause longer than `read_timeout`, and once that has passed, at least [`MIN_BODY_RATE`].
    async fn read(request: Request, limits: &Limits, keep: bool) -> Result<Form, ApiError> {
        let (parts, mut body) = request.into_parts();
        let (max, pause) = (limits.max_upload, limits.read_timeout);
        let (mut kept, mut seen, start) = (Vec::new(), 0usize, tokio::time::Instant::now());
        loop {
            let allowed = start + pause + Duration::from_secs_f64(seen as f64 / MIN_BODY_RATE);
            let until = allowed.min(tokio::time::Instant::now() + pause);
            let Ok(frame) = tokio::time::timeout_at(until, body.frame()).await else {
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, format!("the upload arrived too slowly ({seen} bytes in {:.0} s; the server waits {} s, then wants {} KiB a second)", start.elapsed().as_secs_f64(), pause.as_secs(), MIN_BODY_RATE as usize >> 10)));
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| ApiError::bad(format!("cannot read the request: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            seen += data.len();
            if seen <= max && keep {
                kept.extend_from_slice(&data);
            } else if seen > 4 * max + (1 << 20) {
                break;
            }
        }
        if seen > max {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload ({seen} bytes or more) is larger than the server's limit of {max} bytes (--max-upload-mb)")));
        }
        if !keep {
            return Ok(Form::default());
        }
        let request = Request::from_parts(parts, Body::from(kept));
        let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let err = |e: axum::extract::multipart::MultipartError| ApiError::new(e.status(), format!("cannot read the form: {}", e.body_text()));
        let mut form = Form::default();
        let mut fields = 0usize;
        while let Some(field) = multipart.next_field().await.map_err(err)? {
            fields += 1;
            if fields > MAX_FIELDS {
                return Err(ApiError::bad(format!("the form has more than {MAX_FIELDS} fields")));
            }
            let name = field.name().unwrap_or_default().to_string();
            let file = field.file_name().map(str::to_string);
            let bytes = field.bytes().await.map_err(err)?;
            if name == "image" {
                form.image = Some((file.unwrap_or_else(|| "upload".into()), bytes.to_vec()));
            } else {
                form.fields.entry(name).or_default().push(String::from_utf8_lossy(&bytes).trim().to_string());
            }
        }
        Ok(form)
    }

    /// Whether the form has an image (400 otherwise) that looks like one (415 otherwise), before
    /// it waits for a worker.
    fn check_image(&self) -> Result<(), ApiError> {
        let (name, bytes) = self.image.as_ref().ok_or_else(|| ApiError::bad("the form has no field `image`"))?;
        if image::guess_format(bytes).is_err() {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("{name} is not an image (PNG, JPEG, GIF, BMP, WebP or TIFF)")));
        }
        Ok(())
    }

    /// The image (checked by [`Form::check_image`] before it waited), decoded with the CLI's
    /// limits (its size read from the header first): on a worker, so that decoding is bounded by
    /// the work queue.
    fn image(&self) -> Result<(String, RgbImage), ApiError> {
        let (name, bytes) = self.image.as_ref().ok_or_else(|| ApiError::bad("the form has no field `image`"))?;
        let img = gradcam_encoders::preprocess::decode_image(bytes, name).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        Ok((name.clone(), img))
    }

    /// A text field, at most `most` characters (400 otherwise).
    fn short(&self, name: &str, most: usize) -> Result<Option<String>, ApiError> {
        match self.text(name) {
            Some(t) if t.chars().count() > most => Err(ApiError::bad(format!("`{name}` has {} characters; a request takes at most {most}", t.chars().count()))),
            t => Ok(t),
        }
    }

    /// The field's value (the last one sent), if not empty.
    fn text(&self, name: &str) -> Option<String> {
        self.fields.get(name).and_then(|v| v.last()).filter(|v| !v.is_empty()).cloned()
    }

    /// Every value of a repeated field, empty ones included.
    fn texts(&self, name: &str) -> &[String] {
        self.fields.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    fn flag(&self, name: &str) -> bool {
        self.text(name).is_some_and(|v| matches!(v.as_str(), "1" | "true" | "on" | "yes"))
    }

    /// `method`: one method, or several comma-separated; default Grad-CAM.
    /// The methods asked for, each once, in the order first named: a request cannot multiply
    /// the work by naming one method many times (at most every method once).
    fn settings(&self) -> Result<Settings, ApiError> {
        let mut methods: Vec<Method> = Vec::new();
        for name in self.text("method").as_deref().unwrap_or("gradcam").split(',').map(str::trim) {
            let m = name.parse::<Method>().map_err(|e| ApiError::bad(e.to_string()))?;
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
        Ok(Settings { methods, cancel: Some(Arc::new(AtomicBool::new(false))), ..Default::default() })
    }
}

/// Most fields in one form.
const MAX_FIELDS: usize = 256;
/// Longest text field (a caption, a question, a text to match), characters.
const MAX_TEXT: usize = 1000;
/// Most words in a caption to explain.
const MAX_WORDS: usize = 64;

/// A request admitted into the work queue, with its form. The place is taken before the upload
/// is kept; a busy server reads the body to its end (to answer 503, not a reset) and keeps none of it.
async fn admitted(app: &Arc<App>, request: Request) -> Result<(Ticket, Form), ApiError> {
    let ticket = app.admit();
    let form = Form::read(request, &app.limits, ticket.is_ok()).await?;
    Ok((ticket?, form))
}

/// The record as the answer's JSON, at most [`MAX_ANSWER`] bytes.
fn answer<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, ApiError> {
    let json = serde_json::to_vec(record).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if json.len() > MAX_ANSWER {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the answer would be {} MiB, more than the server's {} MiB; ask for fewer methods or texts", json.len() >> 20, MAX_ANSWER >> 20)));
    }
    Ok(json)
}

fn json(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn missing(what: &str, flag: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("this server has no {what} (start it with {flag})"))
}

const NOWHERE: Files<'static> = Files { dir: None, stem: "upload", discard: false };

pub(crate) async fn caption(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let (ticket, form) = admitted(&app, request).await?;
    if app.models.captioner.is_none() {
        return Err(missing("captioner", "--caption-model DIR"));
    }
    form.check_image()?;
    let caption = form.short("caption", MAX_TEXT)?;
    if let Some(n) = caption.as_ref().map(|c| c.split_whitespace().count()).filter(|&n| n > MAX_WORDS) {
        return Err(ApiError::bad(format!("the caption has {n} words; a request explains at most {MAX_WORDS}")));
    }
    let options = caption::Options { beam: 1, caption, settings: form.settings()? };
    let cancel = options.settings.cancel.clone().expect("settings() sets it");
    let record = app
        .run(ticket, cancel, move |app| {
            let (name, img) = form.image()?;
            let m = app.models.captioner.as_ref().expect("checked above");
            let names = m.dissection.as_ref().map(|d| UnitNames::Dissection(d));
            answer(&caption::caption(&m.model, &img, &name, NOWHERE, &options, names.as_ref(), None)?)
        })
        .await?;
    Ok(json(record))
}

pub(crate) async fn vqa(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let (ticket, form) = admitted(&app, request).await?;
    if app.models.vqa.is_none() {
        return Err(missing("VQA model", "--vqa-model DIR"));
    }
    form.check_image()?;
    let question = form.short("question", MAX_TEXT)?.ok_or_else(|| ApiError::bad("the form has no `question`"))?;
    let options = vqa::Options { answers: form.short("answer", MAX_TEXT)?.into_iter().collect(), counterfactual: form.flag("counterfactual"), top_k: 5, settings: form.settings()? };
    let cancel = options.settings.cancel.clone().expect("settings() sets it");
    let record = app
        .run(ticket, cancel, move |app| {
            let (name, img) = form.image()?;
            let m = app.models.vqa.as_ref().expect("checked above");
            let names = m.dissection.as_ref().map(|d| UnitNames::Dissection(d));
            answer(&vqa::answer(&m.model, &img, &name, &question, NOWHERE, &options, names.as_ref(), None)?)
        })
        .await?;
    Ok(json(record))
}

pub(crate) async fn classify(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let (ticket, form) = admitted(&app, request).await?;
    if app.models.classifier.is_none() {
        return Err(missing("classifier", "--classifier MODEL"));
    }
    form.check_image()?;
    let classes = match form.text("class") {
        Some(c) => vec![c.parse::<usize>().map_err(|_| ApiError::bad(format!("class {c:?} is not a class number")))?],
        None => Vec::new(),
    };
    let resize = app.models.classifier.as_ref().map(|c| c.net.default_resize()).unwrap_or_default();
    let options = classify::Options { classes, top_k: 5, counterfactual: true, neurons: true, settings: form.settings()?, resize, ..Default::default() };
    let cancel = options.settings.cancel.clone().expect("settings() sets it");
    let record = app
        .run(ticket, cancel, move |app| {
            let (name, img) = form.image()?;
            let c = app.models.classifier.as_ref().expect("checked above");
            answer(&classify::classify(&c.net, c.layer, &img, &name, NOWHERE, &options, None)?)
        })
        .await?;
    Ok(json(record))
}

/// Most texts one match request takes.
const MAX_TEXTS: usize = 64;
/// Most maps one match request makes (texts x methods, twice with counterfactuals).
const MAX_MAPS: usize = 256;

pub(crate) async fn matching(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let (ticket, form) = admitted(&app, request).await?;
    if app.models.clip.is_none() {
        return Err(missing("CLIP model", "--clip-model DIR"));
    }
    form.check_image()?;
    let texts = form.texts("text").to_vec();
    if texts.is_empty() {
        return Err(ApiError::bad("the form has no `text`; send one or more `text` fields, one text each"));
    }
    if texts.len() > MAX_TEXTS {
        return Err(ApiError::bad(format!("{} texts; a request takes at most {MAX_TEXTS}", texts.len())));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::bad(format!("`text` number {} (of {}) is empty; give each text some words", i + 1, texts.len())));
    }
    if let Some(i) = texts.iter().position(|t| t.chars().count() > MAX_TEXT) {
        return Err(ApiError::bad(format!("`text` number {} has {} characters; a request takes at most {MAX_TEXT}", i + 1, texts[i].chars().count())));
    }
    let options = matching::Options { texts, layer: form.short("layer", MAX_TEXT)?, softmax: form.flag("softmax"), counterfactual: form.flag("counterfactual"), settings: form.settings()? };
    let maps = options.texts.len() * options.settings.methods.len() * if options.counterfactual { 2 } else { 1 };
    if maps > MAX_MAPS {
        return Err(ApiError::bad(format!("{} texts x {} methods{} is {maps} maps; a request makes at most {MAX_MAPS}", options.texts.len(), options.settings.methods.len(), if options.counterfactual { " x 2 (counterfactual)" } else { "" })));
    }
    let cancel = options.settings.cancel.clone().expect("settings() sets it");
    let record = app
        .run(ticket, cancel, move |app| {
            let (name, img) = form.image()?;
            let c = app.models.clip.as_ref().expect("checked above");
            answer(&matching::match_texts(&c.model, &img, &name, NOWHERE, &options, None)?)
        })
        .await?;
    Ok(json(record))
}

/// What the server explains, for the page.
pub(crate) async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let m = &app.models;
    Json(serde_json::json!({
        "captioner": m.captioner.as_ref().map(|c| serde_json::json!({ "words": c.model.vocab.len(), "dissection": c.dissection.is_some() })),
        "vqa": m.vqa.as_ref().map(|v| serde_json::json!({ "answers": v.model.cfg.answers, "dissection": v.dissection.is_some() })),
        "classifier": m.classifier.as_ref().map(|c| serde_json::json!({ "model": c.net.arch(), "layer": c.net.layer_name(c.layer) })),
        "clip": m.clip.as_ref().map(|c| serde_json::json!({
            "kind": c.model.kind(),
            "path": c.path.display().to_string(),
            "layer": c.layer,
            "layers": c.model.layers(),
            "methods": Method::ALL.into_iter().chain(Method::TRANSFORMER).map(Method::name).collect::<Vec<_>>(),
        })),
        "methods": Method::ALL.map(Method::name),
        "samples": SAMPLES.map(|(name, _)| name),
        "limits": { "workers": app.limits.workers, "queue": app.limits.queue, "max_upload_bytes": app.limits.max_upload, "timeout_seconds": app.limits.timeout.as_secs() },
    }))
}

/// An embedded sample image by name.
pub(crate) async fn sample(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, bytes) = SAMPLES.iter().find(|(n, _)| *n == name).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such sample"))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], *bytes).into_response())
}
