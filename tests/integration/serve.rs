//! `gradcam serve`, started on an ephemeral port: the four APIs answer the CLI's maps, the limits
//! answer 413 / 415 / 404 / 503 with JSON, a load of 200 requests from 8 clients gets no error and
//! no growing memory, and a real browser (headless Chromium) uses the page.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::repo;

/// A running server, stopped when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
}

impl Server {
    pub(crate) fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gradcam"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .current_dir(repo(""))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gradcam serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("no address from gradcam serve: {line:?}\n{err}");
        };
        Server { url: url.trim_end_matches('/').to_string(), child }
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// A size from the server's /proc status (`VmRSS:`, `VmHWM:`), KiB.
    pub(crate) fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A multipart form: text fields and an image file.
pub(crate) fn form(image: &[u8], fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "gradcam-test-boundary-7f3a";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").as_bytes());
    }
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"upload.png\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend(image);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// POSTs a form; returns the status, the JSON body and the Retry-After header.
pub(crate) fn post(url: &str, image: &[u8], fields: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let (content_type, body) = form(image, fields);
    let response = match ureq::post(url).set("Content-Type", &content_type).send_bytes(&body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let (status, retry) = (response.status(), response.header("Retry-After").map(str::to_string));
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url} answered {status} with no JSON ({e}): {text}")), retry)
}

fn get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The CLI's `--json` record of a command.
fn cli_json(args: &[&str]) -> Value {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).args(["--json", "--out"]).arg(out.path()).current_dir(repo("")).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn maps(list: &Value) -> Vec<(bool, Value)> {
    list.as_array().unwrap().iter().map(|e| (e["counterfactual"].as_bool().unwrap(), e["cam"].clone())).collect()
}

#[test]
fn the_three_apis_answer_the_same_maps_as_the_cli() {
    let server = Server::start(&[]);
    let (status, health) = get(&format!("{}/api/health", server.url));
    assert_eq!((status, health.as_str()), (200, r#"{"status":"ok"}"#));
    let scene = std::fs::read(repo("data/shapescenes/test/images/000019.png")).unwrap();

    let (status, caption, _) = post(&format!("{}/api/caption", server.url), &scene, &[]);
    assert_eq!(status, 200, "{caption}");
    let cli = cli_json(&["caption", "data/shapescenes/test/images/000019.png", "--neurons"]);
    assert_eq!(caption["caption"], cli["caption"]);
    assert_eq!(maps(&caption["words"]), maps(&cli["words"]), "caption maps differ from the CLI's");
    assert_eq!(caption["words"][4]["text"], cli["words"][4]["text"], "neuron report");
    assert!(caption["words"][0]["overlay"].as_str().unwrap().starts_with("data:image/png;base64,"));
    assert!(caption["strip"].as_str().unwrap().starts_with("data:image/png;base64,"));

    let q = "what color is the triangle?";
    let (status, vqa, _) = post(&format!("{}/api/vqa", server.url), &scene, &[("question", q), ("counterfactual", "true"), ("method", "gradcam++")]);
    assert_eq!(status, 200, "{vqa}");
    let cli = cli_json(&["vqa", "data/shapescenes/test/images/000019.png", q, "--counterfactual", "--method", "gradcam++"]);
    assert_eq!(vqa["answers"][0], cli["answers"][0]);
    assert_eq!(maps(&vqa["explanations"]), maps(&cli["explanations"]), "VQA maps differ from the CLI's");
    assert_eq!(maps(&vqa["explanations"]).len(), 2, "the answer and its counterfactual");

    let photo = std::fs::read(repo("data/photos/images/chelsea.png")).unwrap();
    let (status, classes, _) = post(&format!("{}/api/classify", server.url), &photo, &[("class", "281")]);
    assert_eq!(status, 200, "{classes}");
    let cli = cli_json(&["classify", "data/photos/images/chelsea.png", "--class", "281", "--counterfactual"]);
    assert_eq!(classes["predictions"], cli["predictions"]);
    assert_eq!(maps(&classes["explanations"]), maps(&cli["explanations"]), "classifier maps differ from the CLI's");
    assert!(classes["explanations"][0]["text"].as_str().unwrap().contains("is supported by unit"));
}

#[test]
fn bad_requests_get_clear_json_errors() {
    let server = Server::start(&["--classifier", "none", "--clip-model", "none", "--max-upload-mb", "1", "--workers", "1", "--queue", "0"]);
    let scene = std::fs::read(repo("data/shapescenes/test/images/000019.png")).unwrap();
    let url = |path: &str| format!("{}{path}", server.url);

    let (status, body, _) = post(&url("/api/caption"), &vec![7u8; 2 << 20], &[]);
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    let (status, body, _) = post(&url("/api/caption"), b"just some text, not an image", &[]);
    assert_eq!(status, 415, "{body}");
    let (status, body, _) = post(&url("/api/caption"), &scene[..200], &[]);
    assert_eq!(status, 422, "a truncated PNG: {body}");
    let (status, body, _) = post(&url("/api/caption"), &scene, &[("method", "gradcam+")]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("guided-gradcam"), "{status} {body}");
    let (status, body, _) = post(&url("/api/vqa"), &scene, &[]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("question"), "{status} {body}");
    let (status, body, _) = post(&url("/api/classify"), &scene, &[]);
    assert!(status == 404 && body["error"].as_str().unwrap().contains("--classifier"), "{status} {body}");
    let (status, body, _) = post(&url("/api/match"), &scene, &[("text", "a red circle")]);
    assert!(status == 404 && body["error"].as_str().unwrap().contains("--clip-model"), "{status} {body}");
    for path in ["/../Cargo.toml", "/samples/..%2F..%2FCargo.toml", "/samples/../../README.md", "/models/vqa/config.json", "/static/page.html"] {
        let (status, body) = get(&url(path));
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("\"error\""), "{path}: {body}");
    }
    let (status, _) = get(&url("/samples/scene-000018.png"));
    assert_eq!(status, 200);

    // One worker, no queue: while Score-CAM of every word runs, the next request is refused.
    let slow = std::thread::spawn({
        let (u, s) = (url("/api/caption"), scene.clone());
        move || post(&u, &s, &[("method", "scorecam,ablationcam,scorecam,ablationcam,scorecam")])
    });
    std::thread::sleep(Duration::from_millis(150));
    let (status, body, retry) = post(&url("/api/caption"), &scene, &[]);
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(slow.join().unwrap().0, 200);
}

#[test]
fn two_hundred_requests_from_eight_clients_get_no_error_and_memory_stays_flat() {
    let server = Server::start(&["--classifier", "none", "--workers", "2"]);
    let scene = std::fs::read(repo("data/shapescenes/test/images/000018.png")).unwrap();
    let url = format!("{}/api/caption", server.url);
    let run = |n: usize| -> Vec<(u16, f64)> {
        let per_client = n / 8;
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (url, scene) = (url.clone(), scene.clone());
                std::thread::spawn(move || {
                    (0..per_client)
                        .map(|_| {
                            let t = Instant::now();
                            let (status, _, _) = post(&url, &scene, &[]);
                            (status, t.elapsed().as_secs_f64() * 1e3)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    };
    let warm = run(8);
    let first: Vec<(u16, f64)> = (0..2).flat_map(|_| run(8)).take(10).collect();
    assert!(warm.iter().chain(&first).all(|(s, _)| *s == 200));
    let rss_first = server.rss_kib();
    let mut results = run(200);
    let rss_after = server.rss_kib();
    let errors = results.iter().filter(|(s, _)| *s != 200).count();
    results.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (p50, p99) = (results[results.len() / 2].1, results[results.len() * 99 / 100].1);
    eprintln!("200 requests, 8 clients: {errors} errors, p50 {p50:.1} ms, p99 {p99:.1} ms, RSS {rss_first} KiB after the first requests, {rss_after} KiB after 200");
    assert_eq!(errors, 0);
    assert!(rss_after as f64 <= 1.2 * rss_first as f64, "RSS grew from {rss_first} KiB to {rss_after} KiB");
}

/// The page in headless Chromium (tests/browser/page_test.py, Selenium): upload a scene, caption
/// it, click a word, and the overlay shown is that word's; the screenshot goes to docs/serve.png.
#[test]
fn the_page_works_in_a_real_browser() {
    let server = Server::start(&["--classifier", "none"]);
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("serve.png");
    let o = Command::new("python3")
        .arg(repo("tests/browser/page_test.py"))
        .arg(&server.url)
        .arg(repo("data/shapescenes/test/images/000018.png"))
        .arg(&png)
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the browser test failed (it needs chromium, chromium-driver and selenium; .ci/run installs them):\n{stdout}\n{stderr}");
    assert!(stdout.contains("word overlay matches"), "{stdout}");
    assert!(std::fs::metadata(&png).unwrap().len() > 10_000, "no screenshot");
    if std::env::var_os("GRADCAM_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&png, repo("docs/serve.png")).unwrap();
    }
}

/// `--html FILE`: one self-contained page (no reference to the written files), which Chromium
/// renders with the caption's words as buttons, each word's picture inline.
#[test]
fn html_export_is_one_self_contained_page() {
    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("report.html");
    let o = html_export(&["caption", "data/shapescenes/test/images/000018.png", "data/shapescenes/test/images/000019.png", "--json"], out.path(), &page);
    let second = out.path().join("report_000019.html");
    for file in [&page, &second] {
        let html = std::fs::read_to_string(file).unwrap();
        assert!(html.contains("window.GRADCAM_DATA"), "{}", file.display());
        assert!(!html.contains(&out.path().display().to_string()), "{} refers to the written files", file.display());
    }
    let record: Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let words = record["words"].as_array().unwrap().len();
    let dom = Command::new("chromium").args(["--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom"]).arg(format!("file://{}", page.display())).output().expect("chromium runs (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom.matches("class=\"word").count(), words, "the page shows the caption's words as buttons");
    assert!(dom.contains("id=\"caption-overlay\"") && dom.contains("data-word="), "a word's picture is shown");
}

/// A request that outlives `--timeout` gets 504, its work is stopped, and the server answers the
/// next request at once (issue 34: the abandoned work went on for minutes, every later request 504).
#[test]
fn a_request_over_the_time_limit_gets_504_and_its_work_stops() {
    let server = Server::start(&["--vqa-model", "none", "--clip-model", "none", "--timeout", "3"]);
    let scene = std::fs::read(repo("data/shapescenes/test/images/000018.png")).unwrap();
    let url = format!("{}/api/caption", server.url);
    // Score-CAM and Ablation-CAM on EfficientNet-Lite0: a forward pass per channel of its 1280,
    // each (a method named several times is explained once: 2,000 names are two methods' work).
    let photo = std::fs::read(repo("data/photos/images/chelsea.png")).unwrap();
    let t = Instant::now();
    let many = vec!["scorecam,ablationcam"; 1000].join(",");
    let (status, body, _) = post(&format!("{}/api/classify", server.url), &photo, &[("method", &many)]);
    assert_eq!(status, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(5), "the answer waited for the work");
    // The abandoned work stops at its next chunk of channels: the next request is answered
    // within seconds (alone, Score-CAM and Ablation-CAM take over 12 s here, and longer beside
    // the other tests; a chunk well under one).
    let start = Instant::now();
    loop {
        let (status, body, _) = post(&url, &scene, &[]);
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the next request waited {:?} for the abandoned work: {status} {body}", start.elapsed());
    }
    assert!(server.rss_kib() < 2 << 20, "RSS {} KiB", server.rss_kib());
}

#[test]
fn an_onnx_classifier_is_served_like_the_built_in_ones() {
    let model = repo("tests/fixtures/onnx/regnet.onnx");
    let server = Server::start(&["--classifier", model.to_str().unwrap(), "--caption-model", "none", "--vqa-model", "none"]);
    let image = std::fs::read(repo("tests/fixtures/onnx/input96.png")).unwrap();
    let (status, classes, _) = post(&format!("{}/api/classify", server.url), &image, &[("class", "3")]);
    assert_eq!(status, 200, "{classes}");
    let cli = cli_json(&["classify", "tests/fixtures/onnx/input96.png", "--model", model.to_str().unwrap(), "--class", "3", "--counterfactual"]);
    assert_eq!(classes["predictions"], cli["predictions"]);
    assert_eq!(classes["layer"], cli["layer"]);
    assert_eq!(maps(&classes["explanations"]), maps(&cli["explanations"]), "ONNX classifier maps differ from the CLI's");
}

/// Where two records differ, ignoring `image` and `overlay` (file names against data URLs);
/// numbers agree within 1e-6.
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys = |m: &serde_json::Map<String, Value>| m.keys().filter(|k| !matches!(k.as_str(), "image" | "overlay")).cloned().collect::<Vec<_>>();
            if keys(x) != keys(y) {
                return Some(format!("{path}: fields {:?} against {:?}", keys(x), keys(y)));
            }
            keys(x).iter().find_map(|k| difference(&x[k], &y[k], &format!("{path}/{k}")))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x.iter().zip(y).enumerate().find_map(|(i, (p, q))| difference(p, q, &format!("{path}/{i}"))),
        (Value::Number(x), Value::Number(y)) => {
            let (p, q) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            ((p - q).abs() > 1e-6).then(|| format!("{path}: {p} against {q}"))
        }
        _ => (a != b).then(|| format!("{path}: {a} against {b}")),
    }
}

/// The CLIP fixture (an ONNX image / text pair) served alone.
fn clip_server() -> Server {
    Server::start(&["--clip-model", "tests/fixtures/clip/tiny", "--classifier", "none", "--caption-model", "none", "--vqa-model", "none"])
}

#[test]
fn the_match_api_answers_the_cli_record() {
    let server = clip_server();
    let image = std::fs::read(repo("tests/fixtures/clip/scene64.png")).unwrap();
    let (status, record, _) = post(&format!("{}/api/match", server.url), &image, &[("text", "a red circle"), ("text", "a blue square"), ("method", "gradcam")]);
    assert_eq!(status, 200, "{record}");
    let cli = cli_json(&["match", "tests/fixtures/clip/scene64.png", "--model", "tests/fixtures/clip/tiny", "--text", "a red circle", "--text", "a blue square"]);
    let texts = record["texts"].as_array().unwrap();
    assert_eq!(texts.iter().map(|t| t["text"].as_str().unwrap()).collect::<Vec<_>>(), ["a red circle", "a blue square"]);
    assert!(texts.iter().all(|t| t["explanations"].as_array().unwrap().len() == 1 && t["cam"].is_array()), "{record}");
    assert!(texts[0]["explanations"][0]["overlay"].as_str().unwrap().starts_with("data:image/png;base64,"));
    if let Some(d) = difference(&record, &cli, "") {
        panic!("the API's record differs from `gradcam match --json` at {d}");
    }
}

#[test]
fn the_clip_model_is_listed_and_a_match_without_text_gets_400() {
    let server = clip_server();
    let (status, models) = get(&format!("{}/api/models", server.url));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let clip = &models["clip"];
    assert_eq!(clip["kind"], "onnx", "{models}");
    assert_eq!(clip["path"], "tests/fixtures/clip/tiny");
    let methods: Vec<&str> = clip["methods"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(["gradcam", "rollout", "relevance"].iter().all(|m| methods.contains(m)), "{methods:?}");
    let layers = clip["layers"].as_array().unwrap();
    assert!(layers.contains(&clip["layer"]), "the default layer {} is not among the layers", clip["layer"]);

    let url = format!("{}/api/match", server.url);
    let image = std::fs::read(repo("tests/fixtures/clip/scene64.png")).unwrap();
    let (status, body, _) = post(&url, &image, &[("method", "gradcam")]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("`text`"), "{status} {body}");
    let (status, body, _) = post(&url, &image, &[("text", "a red circle"), ("text", "  ")]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("empty"), "{status} {body}");
    let (status, body, _) = post(&url, &image, &[("text", "a red circle"), ("softmax", "true")]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("two or more texts"), "{status} {body}");
    let (status, body, _) = post(&url, &image, &[("text", "a red circle"), ("method", "rolout")]);
    assert!(status == 400 && body["error"].as_str().unwrap().contains("rollout"), "{status} {body}");
    let (status, body, _) = post(&url, b"not an image", &[("text", "a red circle")]);
    assert_eq!(status, 415, "{body}");

    // Rollout and relevance, softmax and counterfactuals: a map per text, method and target.
    let (status, record, _) = post(&url, &image, &[("text", "a red circle"), ("text", "a blue square"), ("method", "rollout,relevance"), ("softmax", "true"), ("counterfactual", "true")]);
    assert_eq!(status, 200, "{record}");
    for t in record["texts"].as_array().unwrap() {
        let p = t["probability"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{t}");
        let e: Vec<(&str, bool)> = t["explanations"].as_array().unwrap().iter().map(|e| (e["method"].as_str().unwrap(), e["counterfactual"].as_bool().unwrap())).collect();
        assert_eq!(e, [("rollout", false), ("rollout", true), ("relevance", false), ("relevance", true)]);
    }
}

/// Runs a command (from the repository root) with `--out OUT --html PAGE`; it must succeed.
fn html_export(args: &[&str], out: &std::path::Path, page: &std::path::Path) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_gradcam")).args(args).arg("--out").arg(out).arg("--html").arg(page).current_dir(repo("")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// `gradcam match --html FILE`: the page, in Chromium, shows each text with its similarity and
/// its map inline.
#[test]
fn match_html_export_shows_each_text() {
    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("match.html");
    html_export(&["match", "tests/fixtures/clip/scene64.png", "--model", "tests/fixtures/clip/tiny", "--text", "a red circle", "--text", "a blue square", "--method", "gradcam,rollout"], out.path(), &page);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("window.GRADCAM_DATA") && html.contains("\"match\":"));
    assert!(!html.contains(&out.path().display().to_string()), "the page refers to the written files");
    let dom = Command::new("chromium").args(["--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom"]).arg(format!("file://{}", page.display())).output().expect("chromium runs (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom.matches("class=\"match-title").count(), 2, "one line per text");
    assert!(dom.contains("\"a red circle\": similarity") && dom.contains("\"a blue square\": similarity"));
    assert_eq!(dom.matches("class=\"overlay match-overlay\"").count(), 4, "a map per text and method");
    assert!(dom.contains("data-method=\"rollout\""));
}

/// A method named 20,000 times is one method's work (issue: the request grew the server to 6 GB).
#[test]
fn a_method_named_many_times_is_explained_once() {
    let server = Server::start(&["--classifier", "none", "--clip-model", "none", "--vqa-model", "none"]);
    let scene = std::fs::read(repo("data/shapescenes/test/images/000019.png")).unwrap();
    let many = vec!["gradcam"; 20_000].join(",");
    let start = std::time::Instant::now();
    let (status, body, _) = post(&format!("{}/api/caption", server.url), &scene, &[("method", &many)]);
    assert_eq!(status, 200, "{body}");
    let (_, once, _) = post(&format!("{}/api/caption", server.url), &scene, &[("method", "gradcam")]);
    assert_eq!(body["words"], once["words"], "the same record as one gradcam");
    assert!(start.elapsed().as_secs() < 20, "{:?}", start.elapsed());
}
