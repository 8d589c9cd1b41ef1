//! The front door: every connection passes here before HTTP sees it. At most `max_connections`
//! are open at once (one more is answered 503 and closed); a request's head must arrive whole
//! within `read_timeout` (408 otherwise: a client sending a byte a second is disconnected) and
//! be at most [`MAX_HEAD`] bytes with a target of at most [`MAX_TARGET`] (431, 414); a head that is
//! not HTTP is answered 400. Every answer is JSON. Each connection carries one request (the
//! responses say `Connection: close`), so every request comes through this door.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 64 << 10;
/// Longest request target (path and query), bytes.
pub const MAX_TARGET: usize = 8 << 10;
/// Most header lines.
const MAX_HEADERS: usize = 100;

/// The door's limits.
#[derive(Debug, Clone, Copy)]
pub struct DoorLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's head to arrive.
    pub read_timeout: Duration,
}

/// A listener whose connections have passed the door: axum serves them.
pub struct Door {
    admitted: mpsc::Receiver<(Admitted, SocketAddr)>,
    addr: SocketAddr,
}

impl Door {
    /// Starts admitting the connections of `listener` (on the current tokio runtime).
    pub fn open(listener: TcpListener, limits: DoorLimits) -> io::Result<Door> {
        let addr = listener.local_addr()?;
        let (tx, admitted) = mpsc::channel(64);
        let open = Arc::new(Semaphore::new(limits.max_connections));
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    // Out of file descriptors or a connection reset before accept: wait, go on.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream, StatusCode::SERVICE_UNAVAILABLE, format!("the server has {} connections open, its limit (--max-connections); try again in a moment", limits.max_connections)));
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    match tokio::time::timeout(limits.read_timeout, read_head(&mut stream)).await {
                        Err(_) => refuse(stream, StatusCode::REQUEST_TIMEOUT, format!("the request's head did not arrive within {} s", limits.read_timeout.as_secs())).await,
                        Ok(Err(None)) => {}
                        Ok(Err(Some((status, message)))) => refuse(stream, status, message).await,
                        Ok(Ok(head)) => {
                            let _ = tx.send((Admitted { stream, head, at: 0, _permit: permit }, peer)).await;
                        }
                    }
                });
            }
        });
        Ok(Door { admitted, addr })
    }
}

impl axum::serve::Listener for Door {
    type Io = Admitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Admitted, SocketAddr) {
        match self.admitted.recv().await {
            Some(c) => c,
            // The accepting task ended (only when the runtime shuts down): accept no more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Reads a request head and checks it: the bytes read (the head and perhaps the body's first
/// bytes), or the answer to refuse it with (`None`: the client left).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Option<(StatusCode, String)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| None)?;
        if n == 0 {
            return Err(None);
        }
        let searched = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            check_head(&buf[..searched + end + 4])?;
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            // Still on the request line: the target is what is too long.
            return Err(Some(match buf.windows(2).any(|w| w == b"\r\n") {
                true => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("the request's headers are larger than {} KiB", MAX_HEAD >> 10)),
                false => (StatusCode::URI_TOO_LONG, format!("the request's target is longer than {} KiB", MAX_TARGET >> 10)),
            }));
        }
    }
}

/// Whether a whole head is a request HTTP can serve unambiguously.
fn check_head(head: &[u8]) -> Result<(), Option<(StatusCode, String)>> {
    let bad = |m: String| Some((StatusCode::BAD_REQUEST, m));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("the request's head is incomplete".into())),
        Err(httparse::Error::TooManyHeaders) => return Err(Some((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("the request has more than {MAX_HEADERS} headers")))),
        Err(e) => return Err(bad(format!("the request is not valid HTTP/1: {e}"))),
    }
    if request.path.is_some_and(|p| p.len() > MAX_TARGET) {
        return Err(Some((StatusCode::URI_TOO_LONG, format!("the request's target is longer than {} KiB", MAX_TARGET >> 10))));
    }
    let lengths: Vec<&[u8]> = request.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")).map(|h| h.value).collect();
    if lengths.iter().any(|v| std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u64>().ok()).is_none()) || lengths.windows(2).any(|w| w[0] != w[1]) {
        return Err(bad("the request's Content-Length is not one number".into()));
    }
    if !lengths.is_empty() && request.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
        return Err(bad("the request has both Content-Length and Transfer-Encoding".into()));
    }
    Ok(())
}

/// Answers `status` with `{"error": message}` and closes the connection.
async fn refuse(mut stream: TcpStream, status: StatusCode, message: String) {
    let body = serde_json::json!({ "error": message }).to_string();
    let retry = if status == StatusCode::SERVICE_UNAVAILABLE { "Retry-After: 1\r\n" } else { "" };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n", body.len());
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    // A client that does not read its answer is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// A connection through the door: the head already read is read again first. Holds its place
/// among the open connections until dropped.
pub struct Admitted {
    stream: TcpStream,
    head: Vec<u8>,
    at: usize,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Admitted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str) -> Option<StatusCode> {
        check_head(head.as_bytes()).err().flatten().map(|(s, _)| s)
    }

    #[test]
    fn heads_are_checked() {
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(status("GARBAGE\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET))), Some(StatusCode::URI_TOO_LONG));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Some(StatusCode::BAD_REQUEST));
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
}
