//! HTTP over a plain `TcpStream`: hand-written requests, one response read
//! with a deadline, and the `/health` and `/metrics` endpoints.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{PROMPT, SAMPLE_KEY, find, read_until_deadline};

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    /// Asserts `status` and the exact body `{"error": error}`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, error: &str) {
        assert_eq!(self.status, status, "status; body {:?}", self.body);
        assert_eq!(self.json(), json!({ "error": error }), "error body");
        if let Some(ct) = self.header("content-type") {
            assert!(ct.starts_with("application/json"), "content-type {ct:?}");
        }
    }
}

/// Reads one HTTP response: the head, then `Content-Length` bytes or up to EOF.
/// A `101` returns right after its head.
pub fn read_http_response(
    stream: &mut TcpStream,
    deadline: Instant,
) -> io::Result<(HttpResponse, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = read_until_deadline(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "EOF before a complete response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut header_storage = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut header_storage);
    match parsed.parse(&buf[..head_end]) {
        Ok(httparse::Status::Complete(_)) => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad response head ({other:?}): {:?}",
                    String::from_utf8_lossy(&buf[..head_end])
                ),
            ));
        }
    }
    let status = parsed.code.unwrap_or(0);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut rest = buf.split_off(head_end);
    if status == 101 {
        return Ok((
            HttpResponse {
                status,
                headers,
                body: String::new(),
            },
            rest,
        ));
    }
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    loop {
        if let Some(len) = content_length
            && rest.len() >= len
        {
            let leftover = rest.split_off(len);
            let body = String::from_utf8_lossy(&rest).into_owned();
            return Ok((
                HttpResponse {
                    status,
                    headers,
                    body,
                },
                leftover,
            ));
        }
        match read_until_deadline(stream, &mut chunk, deadline) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            // A reset after a body without Content-Length ends it like EOF.
            Err(e) if content_length.is_none() && e.kind() == io::ErrorKind::ConnectionReset => {
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(len) = content_length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("EOF after {} of {len} body bytes", rest.len()),
        ));
    }
    let body = String::from_utf8_lossy(&rest).into_owned();
    Ok((
        HttpResponse {
            status,
            headers,
            body,
        },
        Vec::new(),
    ))
}

/// Sends `request` bytes and reads one response.
pub fn try_http(port: u16, request: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    read_http_response(&mut stream, deadline).map(|(r, _)| r)
}

/// Sends a hand-written request and returns the response; fails the test on I/O errors.
#[track_caller]
pub fn raw_request(port: u16, request: impl AsRef<[u8]>) -> HttpResponse {
    let request = request.as_ref();
    try_http(port, request, PROMPT).unwrap_or_else(|e| {
        panic!(
            "request {:?} to port {port} failed: {e}",
            String::from_utf8_lossy(&request[..request.len().min(300)])
        )
    })
}

/// `GET path_and_query` with extra headers.
#[track_caller]
pub fn http_get(port: u16, path_and_query: &str, headers: &[(&str, &str)]) -> HttpResponse {
    raw_request(port, request_head("GET", path_and_query, headers))
}

/// A request head with `Host` and the given headers.
pub fn request_head(method: &str, path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// A complete WebSocket upgrade request (RFC 6455's sample key) plus `extra` headers.
pub fn upgrade_request(path_and_query: &str, extra: &[(&str, &str)]) -> String {
    let mut headers = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", SAMPLE_KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    headers.extend_from_slice(extra);
    request_head("GET", path_and_query, &headers)
}

#[track_caller]
pub fn health(port: u16) -> (u16, Value) {
    let resp = http_get(port, "/health", &[]);
    let status = resp.status;
    (status, resp.json())
}

#[track_caller]
pub fn metrics_text(port: u16) -> String {
    let resp = http_get(port, "/metrics", &[]);
    assert_eq!(resp.status, 200, "/metrics status; body {:?}", resp.body);
    resp.body
}

#[track_caller]
pub fn metrics_json(port: u16) -> Value {
    let resp = http_get(port, "/metrics?format=json", &[]);
    assert_eq!(
        resp.status, 200,
        "/metrics?format=json status; body {:?}",
        resp.body
    );
    resp.json()
}

/// The value of the sample `name_with_labels` (exactly as written in the
/// exposition, e.g. `ws_notify_messages_dropped_total{reason="invalid"}`).
pub fn metric_value(text: &str, name_with_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name_with_labels)?;
            let mut fields = rest.split_whitespace();
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            fields.next()?.parse::<f64>().ok()
        })
}

/// A metric from /metrics; 0 when the sample is absent (counters with labels
/// may appear only once they count something).
#[track_caller]
pub fn metric(port: u16, name_with_labels: &str) -> f64 {
    metric_value(&metrics_text(port), name_with_labels).unwrap_or(0.0)
}
