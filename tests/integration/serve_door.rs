//! `gradcam serve` against hostile clients (issue 34), on an ephemeral port: malformed, huge and
//! slow requests get JSON answers and are disconnected, connections over the cap are refused, a
//! busy server refuses uploads before decoding them, and `/api/health` answers throughout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::repo;
use crate::serve::{form, post, Server};

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Sends `bytes` on a new connection and reads the answer to its end: (status, JSON body).
fn raw(server: &Server, bytes: &[u8]) -> (u16, Value) {
    let mut stream = connect(server);
    // The server may answer (and close) before it has read everything sent.
    let _ = stream.write_all(bytes);
    answer(&mut stream)
}

fn answer(stream: &mut TcpStream) -> (u16, Value) {
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {head}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{status} with no JSON ({e}): {body:?}")))
}

fn health(server: &Server) -> Duration {
    let start = Instant::now();
    let (status, body) = raw(server, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    start.elapsed()
}

fn bare() -> Vec<&'static str> {
    vec!["--caption-model", "none", "--vqa-model", "none", "--clip-model", "none"]
}

/// Answers made before a handler runs (by the door or the router) are JSON too (issue 34: 400,
/// 405 and 414 were not).
#[test]
fn every_error_answer_is_json_whoever_makes_it() {
    let server = Server::start(&bare());
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", (0..200).map(|i| format!("X-{i}: 1\r\n")).collect::<String>());
    let huge_header = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(100_000));
    let cases: [(&[u8], u16, &str); 7] = [
        (b"GARBAGE\r\n\r\n", 400, "not valid HTTP"),
        (b"GET /api/classify HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method not allowed"),
        (long_target.as_bytes(), 414, "target is longer than 8 KiB"),
        (many_headers.as_bytes(), 431, "more than 100 headers"),
        (huge_header.as_bytes(), 431, "headers are larger than 64 KiB"),
        (b"POST /api/classify HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "both Content-Length and Transfer-Encoding"),
        (b"GET /samples/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad request"),
    ];
    for (request, status, message) in cases {
        let (got, body) = raw(&server, request);
        let shown = String::from_utf8_lossy(&request[..request.len().min(40)]).to_string();
        assert_eq!(got, status, "{shown:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains(message), "{shown:?}: {body}");
    }
    health(&server);
}

/// Clients that send their head or body a byte at a time are disconnected after `--read-timeout`
/// (408), and 150 of them do not keep `/api/health` from answering at once.
#[test]
fn slow_clients_are_disconnected_and_do_not_starve_the_server() {
    let server = Server::start(&[&bare()[..], &["--read-timeout", "2"]].concat());
    let mut slow: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut s = connect(&server);
            s.write_all(b"GET /api/hea").unwrap();
            s
        })
        .collect();
    assert!(health(&server) < Duration::from_secs(2), "health waited behind the slow clients");
    let start = Instant::now();
    for s in &mut slow {
        let (status, body) = answer(s);
        assert_eq!(status, 408, "{body}");
    }
    assert!(start.elapsed() < Duration::from_secs(10), "the slow clients stayed {:?}", start.elapsed());
    // A body sent a byte at a time: 408 once the pause is over and the rate too low.
    let photo = std::fs::read(repo("data/photos/images/chelsea.png")).unwrap();
    let (content_type, body) = form(&photo, &[]);
    let mut s = connect(&server);
    write!(s, "POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    let start = Instant::now();
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    for byte in &body {
        let _ = s.write(std::slice::from_ref(byte));
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 4096];
        if let Ok(n) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the slow upload was never cut");
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("arrived too slowly"), "{text}");
    health(&server);
}

/// Past `--max-connections` open connections, one more is answered 503 and closed; when they
/// close, the server answers again.
#[test]
fn connections_over_the_cap_are_refused() {
    let server = Server::start(&[&bare()[..], &["--max-connections", "4", "--read-timeout", "30"]].concat());
    let idle: Vec<TcpStream> = (0..4).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = raw(&server, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--max-connections"), "{body}");
    drop(idle);
    let start = Instant::now();
    while raw(&server, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "the closed connections were not given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PNG of `side` x `side` black pixels (small on disk, `3 side^2` bytes decoded).
fn black_png(side: u32) -> Vec<u8> {
    let img = image::RgbImage::new(side, side);
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

/// While the only worker is busy, 16 concurrent uploads of a 49-megapixel PNG get 503 at once,
/// without being decoded (issue 34: they were decoded first: 2.6 GB): the peak RSS grows by less
/// than one decoded image (147 MB).
#[test]
fn a_busy_server_refuses_uploads_before_decoding_them() {
    let server = Server::start(&[&bare()[..], &["--workers", "1", "--queue", "0", "--timeout", "60"]].concat());
    let url = format!("{}/api/classify", server.url);
    let photo = std::fs::read(repo("data/photos/images/chelsea.png")).unwrap();
    let busy = {
        let url = url.clone();
        // Score-CAM and Ablation-CAM on EfficientNet-Lite0: several seconds of work.
        std::thread::spawn(move || post(&url, &photo, &[("method", "scorecam,ablationcam")]))
    };
    let big = std::sync::Arc::new(black_png(7000));
    std::thread::sleep(Duration::from_millis(1500));
    let before = server.status_kib("VmHWM:");
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (url, big) = (url.clone(), big.clone());
            std::thread::spawn(move || post(&url, &big, &[]))
        })
        .collect();
    for c in clients {
        let (status, body, retry) = c.join().unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
    }
    assert!(!busy.is_finished(), "the refusals waited for the worker");
    let grown = server.status_kib("VmHWM:").saturating_sub(before);
    assert!(grown < 100 << 10, "the peak RSS grew by {grown} KiB while refusing");
    // The slow request is not waited for: the server stops, and its client's error is dropped.
    drop(server);
    let _ = busy.join();
}
