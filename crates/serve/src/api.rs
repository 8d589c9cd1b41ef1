//! The API's handlers: each reads a multipart form (the image is the field `image`), runs the
//! library's pipeline for one image in the work queue and answers its record as the CLI's
//! `--json` prints it, with the pictures as PNG data URLs instead of file names.

use std::collections::HashMap;
use std::sync::Arc;

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

use crate::{ApiError, App, SAMPLES};

/// A request's form: the image's bytes and name, and the text fields (each name's values in the
/// order sent).
#[derive(Default)]
struct Form {
    image: Option<(String, Vec<u8>)>,
    fields: HashMap<String, Vec<String>>,
}

impl Form {
    /// Reads the request's multipart form, at most `max` bytes. A larger body is read on (up to
    /// 4x the limit) and dropped, so that the client, still sending, hears the 413 instead of a
    /// reset connection; beyond that the connection is closed.
    async fn read(request: Request, max: usize) -> Result<Form, ApiError> {
        let (parts, mut body) = request.into_parts();
        let (mut kept, mut seen) = (Vec::new(), 0usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad(format!("cannot read the request: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            seen += data.len();
            if seen <= max {
                kept.extend_from_slice(&data);
            } else if seen > 4 * max + (1 << 20) {
                break;
            }
        }
        if seen > max {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload ({seen} bytes or more) is larger than the server's limit of {max} bytes (--max-upload-mb)")));
        }
        let request = Request::from_parts(parts, Body::from(kept));
        let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let err = |e: axum::extract::multipart::MultipartError| ApiError::new(e.status(), format!("cannot read the form: {}", e.body_text()));
        let mut form = Form::default();
        while let Some(field) = multipart.next_field().await.map_err(err)? {
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

    /// The image, decoded with the CLI's limits; 415 when the upload is not an image.
    fn image(&self) -> Result<(String, RgbImage), ApiError> {
        let (name, bytes) = self.image.as_ref().ok_or_else(|| ApiError::bad("the form has no field `image`"))?;
        if image::guess_format(bytes).is_err() {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("{name} is not an image (PNG, JPEG, GIF, BMP, WebP or TIFF)")));
        }
        let img = gradcam_encoders::preprocess::decode_image(bytes, name).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        Ok((name.clone(), img))
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
        let Some(list) = self.text("method") else { return Ok(Settings::default()) };
        let mut methods: Vec<Method> = Vec::new();
        for name in list.split(',').map(str::trim) {
            let m = name.parse::<Method>().map_err(|e| ApiError::bad(e.to_string()))?;
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
        Ok(Settings { methods, ..Default::default() })
    }
}

fn missing(what: &str, flag: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("this server has no {what} (start it with {flag})"))
}

const NOWHERE: Files<'static> = Files { dir: None, stem: "upload" };

pub(crate) async fn caption(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let form = Form::read(request, app.limits.max_upload).await?;
    if app.models.captioner.is_none() {
        return Err(missing("captioner", "--caption-model DIR"));
    }
    let (name, img) = form.image()?;
    let options = caption::Options { beam: 1, caption: form.text("caption"), settings: form.settings()? };
    let record = app
        .run(move |app| {
            let m = app.models.captioner.as_ref().expect("checked above");
            let names = m.dissection.as_ref().map(|d| UnitNames::Dissection(d));
            Ok(caption::caption(&m.model, &img, &name, NOWHERE, &options, names.as_ref(), None)?)
        })
        .await?;
    Ok(Json(record).into_response())
}

pub(crate) async fn vqa(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let form = Form::read(request, app.limits.max_upload).await?;
    if app.models.vqa.is_none() {
        return Err(missing("VQA model", "--vqa-model DIR"));
    }
    let (name, img) = form.image()?;
    let question = form.text("question").ok_or_else(|| ApiError::bad("the form has no `question`"))?;
    let options = vqa::Options { answers: form.text("answer").into_iter().collect(), counterfactual: form.flag("counterfactual"), top_k: 5, settings: form.settings()? };
    let record = app
        .run(move |app| {
            let m = app.models.vqa.as_ref().expect("checked above");
            let names = m.dissection.as_ref().map(|d| UnitNames::Dissection(d));
            Ok(vqa::answer(&m.model, &img, &name, &question, NOWHERE, &options, names.as_ref(), None)?)
        })
        .await?;
    Ok(Json(record).into_response())
}

pub(crate) async fn classify(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let form = Form::read(request, app.limits.max_upload).await?;
    if app.models.classifier.is_none() {
        return Err(missing("classifier", "--classifier MODEL"));
    }
    let (name, img) = form.image()?;
    let classes = match form.text("class") {
        Some(c) => vec![c.parse::<usize>().map_err(|_| ApiError::bad(format!("class {c:?} is not a class number")))?],
        None => Vec::new(),
    };
    let resize = app.models.classifier.as_ref().map(|c| c.net.default_resize()).unwrap_or_default();
    let options = classify::Options { classes, top_k: 5, counterfactual: true, neurons: true, settings: form.settings()?, resize, ..Default::default() };
    let record = app
        .run(move |app| {
            let c = app.models.classifier.as_ref().expect("checked above");
            Ok(classify::classify(&c.net, c.layer, &img, &name, NOWHERE, &options, None)?)
        })
        .await?;
    Ok(Json(record).into_response())
}

/// Most texts one match request takes.
const MAX_TEXTS: usize = 64;

pub(crate) async fn matching(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    // The form is read first, even for a request that will be refused: a connection closed
    // while the client is still sending would reach it as an error, not as our answer.
    let form = Form::read(request, app.limits.max_upload).await?;
    if app.models.clip.is_none() {
        return Err(missing("CLIP model", "--clip-model DIR"));
    }
    let (name, img) = form.image()?;
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
    let options = matching::Options { texts, layer: form.text("layer"), softmax: form.flag("softmax"), counterfactual: form.flag("counterfactual"), settings: form.settings()? };
    let record = app
        .run(move |app| {
            let c = app.models.clip.as_ref().expect("checked above");
            Ok(matching::match_texts(&c.model, &img, &name, NOWHERE, &options, None)?)
        })
        .await?;
    Ok(Json(record).into_response())
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
