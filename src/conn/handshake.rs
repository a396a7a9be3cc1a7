//! The HTTP request head: parsing with httparse (resumable: the head may arrive in
//! pieces) and the decision what to do with it (upgrade, plain answer, or refusal).
//!
//! `evaluate` is pure: it sees the bytes read so far and the rules, and returns a
//! `Decision`. The event loop runs it on every read until it is not `NeedMore`; the
//! fuzz target runs the very same function.

use crate::auth::{Authenticator, TokenSources, extract_token};
use crate::http::Rejection;

/// Largest request head we accept (RFC 6455 servers commonly use 8 KiB, like nginx).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one head; more is answered like an oversized head.
pub const MAX_HEADERS: usize = 64;
/// Most `Cookie` headers looked at for the token.
const MAX_COOKIE_HEADERS: usize = 8;

/// What the server must know to judge an upgrade.
pub struct HandshakeRules<'a> {
    pub authenticator: &'a Authenticator,
    pub allowed_origins: &'a [String],
    pub cookie_name: Option<&'a str>,
    pub max_connections: usize,
    /// 0 = no limit.
    pub max_connections_per_user: usize,
}

/// Live counts the limits are checked against.
pub trait ConnectionCounts {
    fn open_connections(&self) -> usize;
    fn connections_of(&self, user_id: &str) -> usize;
}

/// The outcome of looking at the bytes of a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The head is not complete yet.
    NeedMore,
    /// Answer with an error and close.
    Reject(Rejection),
    /// `GET /health`.
    Health,
    /// `GET /metrics`; `json` when `?format=json`.
    Metrics { json: bool },
    /// A valid, authenticated WebSocket upgrade.
    Upgrade(Upgrade),
}

/// Everything the connection keeps from a successful upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Length of the head; bytes after it already belong to the WebSocket stream.
    pub head_len: usize,
    pub accept_key: String,
    pub user_id: String,
    /// The token's `exp`, unix seconds.
    pub expires_at: u64,
}

/// Parses `buf` (everything read so far) and decides.
pub fn evaluate(buf: &[u8], rules: &HandshakeRules<'_>, counts: &dyn ConnectionCounts) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Decision::Reject(Rejection::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Decision::NeedMore,
        Err(httparse::Error::TooManyHeaders) => return Decision::Reject(Rejection::HeadTooLarge),
        Err(_) => return Decision::Reject(Rejection::BadRequest),
    };
    if head_len > MAX_HEAD_BYTES {
        return Decision::Reject(Rejection::HeadTooLarge);
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Decision::Reject(Rejection::BadRequest);
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let head = Head {
        headers: request.headers,
    };
    match path {
        "/ws" => {}
        "/health" | "/metrics" if method != "GET" => {
            return Decision::Reject(Rejection::MethodNotAllowed);
        }
        "/health" => return Decision::Health,
        "/metrics" => {
            let json = query.is_some_and(|q| q.split('&').any(|pair| pair == "format=json"));
            return Decision::Metrics { json };
        }
        _ => return Decision::Reject(Rejection::NotFound),
    }

    // RFC 6455 4.1: the opening handshake is an HTTP/1.1 (or later) GET.
    if method != "GET" {
        return Decision::Reject(Rejection::MethodNotAllowed);
    }
    if request.version != Some(1) {
        return Decision::Reject(Rejection::BadRequest);
    }
    if !head.has_token("upgrade", "websocket") || !head.has_token("connection", "upgrade") {
        return Decision::Reject(Rejection::UpgradeRequired);
    }
    if head.value("sec-websocket-version").map(trim) != Some(b"13".as_slice()) {
        return Decision::Reject(Rejection::UnsupportedVersion);
    }
    let Some(key) = head
        .value("sec-websocket-key")
        .map(trim)
        .filter(|k| is_valid_key(k))
    else {
        return Decision::Reject(Rejection::BadKey);
    };
    if !rules.allowed_origins.is_empty() {
        let allowed = head.value("origin").is_some_and(|origin| {
            rules
                .allowed_origins
                .iter()
                .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin))
        });
        if !allowed {
            return Decision::Reject(Rejection::OriginNotAllowed);
        }
    }
    // Checked before the token so that a storm of connections costs no signature checks.
    if counts.open_connections() >= rules.max_connections {
        return Decision::Reject(Rejection::ConnectionLimit);
    }

    let mut cookies = [&[][..]; MAX_COOKIE_HEADERS];
    let mut cookie_count = 0;
    for header in head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
    {
        if cookie_count < MAX_COOKIE_HEADERS {
            cookies[cookie_count] = header.value;
            cookie_count += 1;
        }
    }
    let sources = TokenSources {
        authorization: head.value("authorization"),
        cookies: &cookies[..cookie_count],
        query: query.map(str::as_bytes),
    };
    let Some(token) = extract_token(&sources, rules.cookie_name) else {
        return Decision::Reject(Rejection::MissingToken);
    };
    let identity = match rules.authenticator.authenticate(&token) {
        Ok(identity) => identity,
        Err(reason) => {
            log::debug!("token refused: {}", reason.as_str());
            return Decision::Reject(Rejection::InvalidToken);
        }
    };
    if rules.max_connections_per_user > 0
        && counts.connections_of(&identity.user_id) >= rules.max_connections_per_user
    {
        return Decision::Reject(Rejection::UserLimit);
    }
    Decision::Upgrade(Upgrade {
        head_len,
        accept_key: tungstenite::handshake::derive_accept_key(key),
        user_id: identity.user_id,
        expires_at: identity.expires_at,
    })
}

struct Head<'h, 'b> {
    headers: &'h [httparse::Header<'b>],
}

impl<'b> Head<'_, 'b> {
    /// The first header of that name (names are case-insensitive).
    fn value(&self, name: &str) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether any header of that name lists `token` in its comma-separated value
    /// (`Connection: keep-alive, Upgrade` as Firefox sends it).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|item| trim(item).eq_ignore_ascii_case(token.as_bytes()))
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// RFC 6455 4.2.1: the key is 16 random bytes, base64-encoded (24 characters, ending `==`).
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ!="));
        assert!(!is_valid_key(b""));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
