//! `gradcam serve`: the paper's web demo, local. One page (embedded in the binary) and a JSON API
//! over the same library calls the CLI makes (`gradcam::pipeline`): captions explained word by
//! word, answers and what argues against them, ImageNet classes, and CLIP-style image-text
//! matches (each text's similarity explained).
//!
//! Safety, as a public-facing server needs it:
//! - connections pass [`door`] first: at most `max_connections` open, a request's head within
//!   `read_timeout`, heads and targets of bounded size;
//! - a bounded work queue (`workers` running, `queue` waiting, the rest 503 with `Retry-After`),
//!   checked before the upload is kept or decoded; images are decoded by the workers, after their
//!   size is read from the header;
//! - uploads over the limit get 413, anything that is not an image 415; a body must keep arriving
//!   (at least [`MIN_BODY_RATE`] after `read_timeout`, no pause longer than it: 408 otherwise);
//! - a time limit per request (504), after which its work is cancelled and its worker freed;
//! - caps on what one request asks (each method once, texts, words) and on the answer's size;
//! - only the embedded assets and the API are routed (any other path, `..` included, is a 404);
//!   every error is a JSON object `{"error": ...}`, whoever made it (door, router or handler).
#![forbid(unsafe_code)]

mod api;
pub mod cli;
pub mod door;
pub mod html;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gradcam_captioner::Captioner;
use gradcam_clip::Matcher;
use gradcam_encoders::Network;
use gradcam_neurons::Dissection;
use gradcam_vqa::Vqa;
use tokio::sync::Semaphore;

/// A model with the dissection table that names its units, if any.
pub struct Named<M> {
    /// The model.
    pub model: M,
    /// Its `dissection.json`.
    pub dissection: Option<Dissection>,
}

/// An ImageNet classifier and the layer it is explained at.
pub struct Classifier {
    /// The network.
    pub net: Network,
    /// The explained layer's index.
    pub layer: usize,
}

/// A CLIP model (trained here or an ONNX pair), with where it came from.
pub struct Clip {
    /// The model.
    pub model: Matcher,
    /// Its folder.
    pub path: PathBuf,
    /// The image tower's value explained by default.
    pub layer: String,
}

/// What the server explains; any of them may be absent (its API then answers 404).
#[derive(Default)]
pub struct Models {
    /// The captioner (`--caption-model`).
    pub captioner: Option<Named<Captioner>>,
    /// The VQA model (`--vqa-model`).
    pub vqa: Option<Named<Vqa>>,
    /// The classifier (`--classifier`).
    pub classifier: Option<Classifier>,
    /// The CLIP model (`--clip-model`).
    pub clip: Option<Clip>,
}

/// How much work the server takes on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests explained at once.
    pub workers: usize,
    /// Requests waiting beyond those; more are refused with 503.
    pub queue: usize,
    /// Largest request body, bytes.
    pub max_upload: usize,
    /// Time from arrival to answer; later requests get 504.
    pub timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's head to arrive, and the longest pause in its body.
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { workers: 1, queue: 8, max_upload: 20 << 20, timeout: Duration::from_secs(120), max_connections: 512, read_timeout: Duration::from_secs(10) }
    }
}

/// The slowest a request body may arrive once `read_timeout` has passed, bytes a second.
pub const MIN_BODY_RATE: f64 = 16_384.0;

/// Largest answer, bytes: a request whose record is larger gets 413 (ask for fewer methods or
/// texts).
pub const MAX_ANSWER: usize = 64 << 20;

/// The server's state.
pub struct App {
    /// The models.
    pub models: Models,
    /// The limits.
    pub limits: Limits,
    workers: Arc<Semaphore>,
    admitted: AtomicUsize,
}

impl App {
    /// A server over `models` with `limits`.
    pub fn new(models: Models, limits: Limits) -> Arc<Self> {
        let workers = Arc::new(Semaphore::new(limits.workers.max(1)));
        Arc::new(App { models, limits, workers, admitted: AtomicUsize::new(0) })
    }

    /// A place in the work queue, taken when a request arrives (before its upload is kept or
    /// decoded); busy (503) when `workers + queue` requests are in already.
    fn admit(self: &Arc<Self>) -> Result<Ticket, ApiError> {
        let capacity = self.limits.workers.max(1) + self.limits.queue;
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= capacity {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::busy());
        }
        Ok(Ticket { app: self.clone(), deadline: tokio::time::Instant::now() + self.limits.timeout })
    }

    /// Runs `work` on a worker thread when one is free, by the ticket's deadline. At the deadline
    /// the answer is 504 and `cancel` is set: the work stops at its next check and frees the
    /// worker.
    async fn run<T: Send + 'static>(self: &Arc<Self>, ticket: Ticket, cancel: Arc<AtomicBool>, work: impl FnOnce(&App) -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
        // Set when this future ends, whether answered, timed out or dropped with its connection:
        // work still running then stops.
        struct Stop(Arc<AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(cancel);
        let deadline = ticket.deadline;
        let permit = tokio::time::timeout_at(deadline, self.workers.clone().acquire_owned()).await.map_err(|_| ApiError::timeout())?.map_err(|_| ApiError::busy())?;
        let app = self.clone();
        // The permit stays with the work: a request that times out holds its worker until its
        // work sees the cancel flag, so the number of running explanations never exceeds `workers`.
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&app)
        });
        let result = match tokio::time::timeout_at(deadline, task).await {
            Err(_) => Err(ApiError::timeout()),
            Ok(Err(join)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the explanation failed: {join}"))),
            Ok(Ok(result)) => result,
        };
        drop(ticket);
        result
    }
}

/// A request's place in the work queue, given back when dropped.
struct Ticket {
    app: Arc<App>,
    deadline: tokio::time::Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.app.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An error as the API answers it: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn busy() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "the server is busy; try again in a moment")
    }

    fn timeout() -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "the explanation took longer than the server's time limit; its work was stopped")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            return (self.status, [(header::RETRY_AFTER, "1")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

impl From<gradcam::pipeline::Error> for ApiError {
    fn from(e: gradcam::pipeline::Error) -> Self {
        ApiError::bad(e.to_string())
    }
}

/// The explorer page.
pub const PAGE: &str = include_str!("../assets/page.html");

/// Sample images the page offers, embedded.
pub const SAMPLES: [(&str, &[u8]); 4] = [
    ("scene-000018.png", include_bytes!("../assets/scene-000018.png")),
    ("scene-000019.png", include_bytes!("../assets/scene-000019.png")),
    ("cat_and_coffee.png", include_bytes!("../assets/cat_and_coffee.png")),
    ("chelsea.png", include_bytes!("../assets/chelsea.png")),
];

/// The routes: the page, the samples and the API. Nothing else, and nothing from the file system.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }))
        .route("/samples/{name}", get(api::sample))
        .route("/api/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/api/models", get(api::models))
        .route("/api/caption", post(api::caption))
        .route("/api/vqa", post(api::vqa))
        .route("/api/classify", post(api::classify))
        .route("/api/match", post(api::matching))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page") })
        // The API reads bodies itself, to its own limit (see `api::Form::read`).
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(finish))
        .with_state(app)
}

/// Every answer closes its connection (so that each request passes the [`door`]), and every
/// error answer is JSON, those made by the router (405, a bad path: 400) included.
async fn finish(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    let status = response.status();
    let json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let allow = if status == StatusCode::METHOD_NOT_ALLOWED { "; this path takes the method(s) in the answer's Allow header" } else { "" };
    let message = if text.is_empty() { format!("{reason}{allow}") } else { format!("{reason}: {text}{allow}") };
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Serves `app` on `listener` until Ctrl-C, every connection through the [`door`].
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) -> std::io::Result<()> {
    let limits = door::DoorLimits { max_connections: app.limits.max_connections, read_timeout: app.limits.read_timeout };
    let door = door::Door::open(listener, limits)?;
    axum::serve(door, router(app)).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Whether serving on `addr` exposes the server beyond this machine.
pub fn is_public(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}
