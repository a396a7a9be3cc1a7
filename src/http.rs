//! Plain HTTP answers (errors, /health, /metrics) and small HTTP text helpers.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Why a request was answered with an error instead of an upgrade (the README's
/// error table, under "Connecting").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MissingToken,
    InvalidToken,
    OriginNotAllowed,
    ConnectionLimit,
    UserLimit,
    BadRequest,
    BadKey,
    UnsupportedVersion,
    UpgradeRequired,
    MethodNotAllowed,
    HeadTooLarge,
    NotFound,
    InvalidSince,
}

impl Rejection {
    pub const ALL: [Rejection; 13] = [
        Rejection::MissingToken,
        Rejection::InvalidToken,
        Rejection::OriginNotAllowed,
        Rejection::ConnectionLimit,
        Rejection::UserLimit,
        Rejection::BadRequest,
        Rejection::BadKey,
        Rejection::UnsupportedVersion,
        Rejection::UpgradeRequired,
        Rejection::MethodNotAllowed,
        Rejection::HeadTooLarge,
        Rejection::NotFound,
        Rejection::InvalidSince,
    ];

    /// HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            Rejection::MissingToken | Rejection::InvalidToken => 401,
            Rejection::OriginNotAllowed => 403,
            Rejection::ConnectionLimit => 503,
            Rejection::UserLimit => 429,
            Rejection::BadRequest | Rejection::BadKey | Rejection::InvalidSince => 400,
            Rejection::UnsupportedVersion | Rejection::UpgradeRequired => 426,
            Rejection::MethodNotAllowed => 405,
            Rejection::HeadTooLarge => 431,
            Rejection::NotFound => 404,
        }
    }

    /// The `error` text of the JSON body (the Go service's wording where it had one).
    pub fn message(self) -> &'static str {
        match self {
            Rejection::MissingToken => "missing token parameter",
            Rejection::InvalidToken => "invalid or expired token",
            Rejection::OriginNotAllowed => "origin not allowed",
            Rejection::ConnectionLimit => "connection limit reached",
            Rejection::UserLimit => "too many connections for this user",
            Rejection::BadRequest => "bad request",
            Rejection::BadKey => "missing or invalid Sec-WebSocket-Key",
            Rejection::UnsupportedVersion => "unsupported Sec-WebSocket-Version (13 required)",
            Rejection::UpgradeRequired => "websocket upgrade required",
            Rejection::MethodNotAllowed => "method not allowed",
            Rejection::HeadTooLarge => "request header too large",
            Rejection::NotFound => "not found",
            Rejection::InvalidSince => "invalid since",
        }
    }

    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MissingToken => "missing_token",
            Rejection::InvalidToken => "invalid_token",
            Rejection::OriginNotAllowed => "origin_not_allowed",
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::UserLimit => "user_limit",
            Rejection::BadRequest => "bad_request",
            Rejection::BadKey => "bad_key",
            Rejection::UnsupportedVersion => "unsupported_version",
            Rejection::UpgradeRequired => "upgrade_required",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::HeadTooLarge => "header_too_large",
            Rejection::NotFound => "not_found",
            Rejection::InvalidSince => "invalid_since",
        }
    }

    /// Headers the answer must carry besides the usual ones.
    fn extra_headers(self) -> &'static str {
        match self {
            // RFC 6455 4.4: tell the client which version we speak.
            Rejection::UnsupportedVersion => "Sec-WebSocket-Version: 13\r\n",
            Rejection::UpgradeRequired => "Upgrade: websocket\r\n",
            Rejection::MethodNotAllowed => "Allow: GET\r\n",
            _ => "",
        }
    }

    /// The complete HTTP answer.
    pub fn response(self) -> Vec<u8> {
        let mut body = String::with_capacity(64);
        body.push_str("{\"error\":");
        // Messages are static ASCII without quotes; serde_json keeps this honest anyway.
        body.push_str(&serde_json::to_string(self.message()).unwrap_or_default());
        body.push('}');
        response(
            self.status(),
            "application/json",
            self.extra_headers(),
            body.as_bytes(),
        )
    }
}

/// A complete `Connection: close` HTTP/1.1 answer.
pub fn response(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut head = String::with_capacity(160 + extra_headers.len());
    // Writing into a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra_headers}\r\n",
        reason_phrase(status),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The 101 answer that completes a WebSocket upgrade.
pub fn switching_protocols(accept_key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(129);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept_key.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Decodes `%XX` escapes (and `+` as space when `plus_as_space`), as in
/// `application/x-www-form-urlencoded` query strings and URL user info.
/// Malformed escapes are kept literally, like browsers and Go's lenient parsers do.
pub fn percent_decode(input: &[u8], plus_as_space: bool) -> Cow<'_, [u8]> {
    if !input
        .iter()
        .any(|&b| b == b'%' || (plus_as_space && b == b'+'))
    {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' if i + 2 < input.len() => {
                match (hex_value(input[i + 1]), hex_value(input[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_as_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_cases() {
        assert_eq!(&*percent_decode(b"abc", true), b"abc");
        assert_eq!(&*percent_decode(b"a%2Eb%2e", false), b"a.b.");
        assert_eq!(&*percent_decode(b"a+b", true), b"a b");
        assert_eq!(&*percent_decode(b"a+b", false), b"a+b");
        assert_eq!(&*percent_decode(b"%", true), b"%");
        assert_eq!(&*percent_decode(b"%4", true), b"%4");
        assert_eq!(&*percent_decode(b"%zz1", true), b"%zz1");
        assert_eq!(&*percent_decode(b"%41%", true), b"A%");
    }
}
