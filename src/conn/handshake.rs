//! The HTTP request head: parsing with httparse (resumable: the head may arrive in
//! pieces) and the decision what to do with it (upgrade, plain answer, or refusal).
//!
//! `evaluate` is pure: it sees the bytes read so far and the rules, and returns a
//! `Decision`. The event loop runs it on every read until it is not `NeedMore`; the
//! fuzz target runs the very same function.

use crate::auth::{Authenticator, Identity, TokenSource, TokenSources, token_candidates};
use crate::history::StreamId;
use crate::http::Rejection;

/// Largest request head we accept (RFC 6455 servers commonly use 8 KiB, like nginx).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in one head; more is answered like an oversized head.
pub const MAX_HEADERS: usize = 64;
/// Most `Cookie` headers looked at for the token (the cookies tried are capped
/// separately, by `auth::MAX_COOKIE_CANDIDATES`).
const MAX_COOKIE_HEADERS: usize = 8;

/// What the server must know to judge an upgrade.
pub struct HandshakeRules<'a> {
    pub authenticator: &'a Authenticator,
    pub allowed_origins: &'a [String],
    pub cookie_name: Option<&'a str>,
    pub max_connections: usize,
    /// 0 = no limit.
    pub max_connections_per_user: usize,
    /// The paths served on the listener the request came in on.
    pub endpoints: Endpoints,
}

/// Which paths a listener serves (`WS_ADMIN_ADDR`, README "Configuration"); the
/// others are answered 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// `/ws`, `/health` and `/metrics`: the only listener (no `WS_ADMIN_ADDR`).
    All,
    /// `/ws` only: the main listener beside an admin one.
    WebSocket,
    /// `/health` and `/metrics` only: the admin listener.
    Admin,
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
    /// `GET /health`, or `HEAD /health` (`head_only`: the same answer without its body).
    Health { head_only: bool },
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
    /// `?since=<stream id>`: the client resumes after this message.
    pub since: Option<StreamId>,
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
    let admin_path = matches!(path, "/health" | "/metrics");
    if matches!(
        (rules.endpoints, admin_path),
        (Endpoints::WebSocket, true) | (Endpoints::Admin, false)
    ) {
        return Decision::Reject(Rejection::NotFound);
    }
    match path {
        "/ws" => {}
        "/health" if method == "GET" || method == "HEAD" => {
            return Decision::Health {
                head_only: method == "HEAD",
            };
        }
        "/health" | "/metrics" if method != "GET" => {
            return Decision::Reject(Rejection::MethodNotAllowed);
        }
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

    let mut cookies = [&[][..]; MAX_COOKIE_HEADERS];
    let mut cookie_count = 0;
    for header in head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .take(MAX_COOKIE_HEADERS)
    {
        cookies[cookie_count] = header.value;
        cookie_count += 1;
    }
    let sources = TokenSources {
        authorization: head.value("authorization"),
        cookies: &cookies[..cookie_count],
        query: query.map(str::as_bytes),
    };
    // The token comes before the upgrade headers, as in the Go service: a
    // monitoring probe's plain `GET /ws` gets 401 `missing token parameter`.
    // Only its presence is checked here; validation waits until the cheap checks
    // below have passed.
    if token_candidates(&sources, rules.cookie_name)
        .next()
        .is_none()
    {
        return Decision::Reject(Rejection::MissingToken);
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
    // Browsers always send `Origin` on a WebSocket; a request without one is not
    // a browser (a native app, a backend, `ws-notify listen`) and is let through,
    // as gorilla/websocket does. A listed `Origin` is what a cookie token needs.
    let origin_listed = match head.value("origin") {
        None => false,
        Some(origin) => {
            let listed = rules
                .allowed_origins
                .iter()
                .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin));
            if !listed && !rules.allowed_origins.is_empty() {
                return Decision::Reject(Rejection::OriginNotAllowed);
            }
            listed
        }
    };
    let since = match since_parameter(query) {
        Ok(since) => since,
        Err(rejection) => return Decision::Reject(rejection),
    };
    // Checked before the token so that a storm of connections costs no signature checks.
    if counts.open_connections() >= rules.max_connections {
        return Decision::Reject(Rejection::ConnectionLimit);
    }

    let identity = match first_valid_token(&sources, rules, origin_listed) {
        Ok(identity) => identity,
        Err(rejection) => return Decision::Reject(rejection),
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
        since,
    })
}

/// The first `since` query parameter, a stream id (`ms-seq` or `ms`; both are
/// digits and `-` only, so there is nothing to percent-decode). Present but not
/// a stream id: 400 `invalid since`.
pub fn since_parameter(query: Option<&str>) -> Result<Option<StreamId>, Rejection> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("since="))
    else {
        return Ok(None);
    };
    StreamId::parse(value)
        .map(Some)
        .ok_or(Rejection::InvalidSince)
}

/// The first token that validates, trying the sources in the documented order
/// (at most `MAX_TOKEN_CANDIDATES` signature checks), so a stale cookie does not
/// hide a valid query token. A cookie counts only with a listed `Origin`
/// (cross-site WebSocket hijacking); without one it is passed over like an
/// absent cookie, and if it was the only token the answer is 403.
fn first_valid_token(
    sources: &TokenSources<'_>,
    rules: &HandshakeRules<'_>,
    origin_listed: bool,
) -> Result<Identity, Rejection> {
    let mut refusal = Rejection::MissingToken;
    for candidate in token_candidates(sources, rules.cookie_name) {
        if candidate.source == TokenSource::Cookie && !origin_listed {
            if refusal == Rejection::MissingToken {
                refusal = Rejection::OriginNotAllowed;
            }
            log::debug!("cookie token passed over: no listed Origin");
            continue;
        }
        match rules.authenticator.authenticate(&candidate.token) {
            Ok(identity) => return Ok(identity),
            Err(reason) => {
                log::debug!(
                    "token refused: {} (from {})",
                    reason.as_str(),
                    candidate.source.as_str()
                );
                refusal = Rejection::InvalidToken;
            }
        }
    }
    Err(refusal)
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
    use crate::config::Config;

    const SECRET: &str = "handshake-test-secret";

    struct Counts {
        open: usize,
        per_user: usize,
    }

    impl ConnectionCounts for Counts {
        fn open_connections(&self) -> usize {
            self.open
        }
        fn connections_of(&self, _user_id: &str) -> usize {
            self.per_user
        }
    }

    const NO_LOAD: Counts = Counts {
        open: 0,
        per_user: 0,
    };

    fn authenticator() -> Authenticator {
        let config =
            Config::from_lookup(|name| (name == "JWT_SECRET_KEY").then(|| SECRET.to_string()))
                .expect("test config");
        Authenticator::new(&config.jwt).expect("authenticator")
    }

    fn token(sub: &str) -> String {
        let claims = serde_json::json!({ "sub": sub, "exp": crate::clock::unix_secs_now() + 600 });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    fn upgrade_head(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn decide(head: &[u8], origins: &[String], counts: &Counts) -> Decision {
        decide_with_cookie(head, origins, None, counts)
    }

    fn decide_with_cookie(
        head: &[u8],
        origins: &[String],
        cookie_name: Option<&str>,
        counts: &Counts,
    ) -> Decision {
        decide_on(head, origins, cookie_name, counts, Endpoints::All)
    }

    fn decide_on(
        head: &[u8],
        origins: &[String],
        cookie_name: Option<&str>,
        counts: &Counts,
        endpoints: Endpoints,
    ) -> Decision {
        let authenticator = authenticator();
        let rules = HandshakeRules {
            authenticator: &authenticator,
            allowed_origins: origins,
            cookie_name,
            max_connections: 10,
            max_connections_per_user: 2,
            endpoints,
        };
        evaluate(head, &rules, counts)
    }

    fn rejection(head: &[u8]) -> Option<Rejection> {
        match decide(head, &[], &NO_LOAD) {
            Decision::Reject(r) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn valid_upgrade_keeps_pipelined_bytes_out_of_the_head() {
        let head = upgrade_head(&format!("/ws?token={}", token("alice")), "");
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(b"\x81\x85frame");
        match decide(&bytes, &[], &NO_LOAD) {
            Decision::Upgrade(upgrade) => {
                assert_eq!(upgrade.head_len, head.len());
                assert_eq!(upgrade.user_id, "alice");
                assert_eq!(upgrade.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            }
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    #[test]
    fn since_is_a_stream_id_or_refused() {
        let since_of = |query: &str| {
            let head = upgrade_head(&format!("/ws?token={}&{query}", token("alice")), "");
            match decide(head.as_bytes(), &[], &NO_LOAD) {
                Decision::Upgrade(upgrade) => Ok(upgrade.since),
                Decision::Reject(rejection) => Err(rejection),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(since_of("since=17-3"), Ok(StreamId::parse("17-3")));
        assert_eq!(since_of("since=17"), Ok(StreamId::parse("17-0")));
        assert_eq!(since_of("x=1"), Ok(None));
        // The first one counts.
        assert_eq!(since_of("since=5-1&since=junk"), Ok(StreamId::parse("5-1")));
        for bad in [
            "since=",
            "since=abc",
            "since=1-",
            "since=%35-1",
            "since=1-2-3",
        ] {
            assert_eq!(since_of(bad), Err(Rejection::InvalidSince), "{bad}");
        }
        assert_eq!(Rejection::InvalidSince.status(), 400);
        assert_eq!(Rejection::InvalidSince.message(), "invalid since");
    }

    #[test]
    fn a_head_in_pieces_needs_more_until_complete() {
        let head = upgrade_head(&format!("/ws?token={}", token("bob")), "");
        for cut in [0, 1, 10, head.len() - 1] {
            assert_eq!(
                decide(&head.as_bytes()[..cut], &[], &NO_LOAD),
                Decision::NeedMore
            );
        }
    }

    #[test]
    fn plain_endpoints() {
        assert_eq!(
            decide(b"GET /health HTTP/1.1\r\n\r\n", &[], &NO_LOAD),
            Decision::Health { head_only: false }
        );
        assert_eq!(
            decide(b"HEAD /health HTTP/1.1\r\n\r\n", &[], &NO_LOAD),
            Decision::Health { head_only: true }
        );
        assert_eq!(
            decide(b"GET /metrics?format=json HTTP/1.1\r\n\r\n", &[], &NO_LOAD),
            Decision::Metrics { json: true }
        );
        assert_eq!(
            decide(b"GET /metrics HTTP/1.1\r\n\r\n", &[], &NO_LOAD),
            Decision::Metrics { json: false }
        );
        assert_eq!(
            rejection(b"GET /nope HTTP/1.1\r\n\r\n"),
            Some(Rejection::NotFound)
        );
        assert_eq!(
            rejection(b"POST /health HTTP/1.1\r\n\r\n"),
            Some(Rejection::MethodNotAllowed)
        );
    }

    #[test]
    fn an_admin_listener_splits_the_paths() {
        let on = |endpoints, head: &str| decide_on(head.as_bytes(), &[], None, &NO_LOAD, endpoints);
        let upgrade = upgrade_head(&format!("/ws?token={}", token("alice")), "");
        let not_found = Decision::Reject(Rejection::NotFound);
        // Beside an admin listener the main one serves /ws only ...
        assert!(matches!(
            on(Endpoints::WebSocket, &upgrade),
            Decision::Upgrade(_)
        ));
        for head in [
            "GET /health HTTP/1.1\r\n\r\n",
            "HEAD /health HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "POST /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(on(Endpoints::WebSocket, head), not_found, "{head}");
        }
        // ... and the admin listener /health and /metrics only.
        assert_eq!(on(Endpoints::Admin, &upgrade), not_found);
        assert_eq!(
            on(Endpoints::Admin, "GET /nope HTTP/1.1\r\n\r\n"),
            not_found
        );
        assert_eq!(
            on(Endpoints::Admin, "GET /health HTTP/1.1\r\n\r\n"),
            Decision::Health { head_only: false }
        );
        assert_eq!(
            on(Endpoints::Admin, "GET /metrics HTTP/1.1\r\n\r\n"),
            Decision::Metrics { json: false }
        );
    }

    #[test]
    fn upgrade_errors() {
        let ok = upgrade_head(&format!("/ws?token={}", token("carol")), "");
        let cases = [
            (ok.replace("GET", "POST"), Rejection::MethodNotAllowed),
            (ok.replace("HTTP/1.1", "HTTP/1.0"), Rejection::BadRequest),
            (
                ok.replace("Upgrade: websocket", "Upgrade: h2c"),
                Rejection::UpgradeRequired,
            ),
            (
                ok.replace("Version: 13", "Version: 12"),
                Rejection::UnsupportedVersion,
            ),
            (
                ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                Rejection::BadKey,
            ),
            (upgrade_head("/ws", ""), Rejection::MissingToken),
            (
                upgrade_head("/ws?token=abc.def.ghi", ""),
                Rejection::InvalidToken,
            ),
        ];
        for (head, expected) in cases {
            assert_eq!(rejection(head.as_bytes()), Some(expected), "{head}");
        }
    }

    #[test]
    fn limits_and_origins() {
        let head = upgrade_head(
            &format!("/ws?token={}", token("dave")),
            "Origin: https://app.example\r\n",
        );
        let allowed = ["https://app.example".to_string()];
        let other = ["https://other.example".to_string()];
        let full = Counts {
            open: 10,
            per_user: 0,
        };
        let busy_user = Counts {
            open: 3,
            per_user: 2,
        };
        // The global limit is checked before the token is validated.
        let bad_token = upgrade_head("/ws?token=a.b.c", "");
        let cases: [(&str, &[String], &Counts, Option<Rejection>); 5] = [
            (&head, &allowed, &NO_LOAD, None),
            (&head, &other, &NO_LOAD, Some(Rejection::OriginNotAllowed)),
            (&head, &[], &full, Some(Rejection::ConnectionLimit)),
            (&bad_token, &[], &full, Some(Rejection::ConnectionLimit)),
            (&head, &[], &busy_user, Some(Rejection::UserLimit)),
        ];
        for (head, origins, counts, expected) in cases {
            match (decide(head.as_bytes(), origins, counts), expected) {
                (Decision::Upgrade(_), None) => {}
                (Decision::Reject(got), Some(expected)) => assert_eq!(got, expected, "{head}"),
                (got, expected) => panic!("{head}: {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn token_presence_is_checked_before_the_upgrade_headers() {
        assert_eq!(
            rejection(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Rejection::MissingToken)
        );
        // Validation waits for the cheap checks.
        assert_eq!(
            rejection(b"GET /ws?token=a.b.c HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Rejection::UpgradeRequired)
        );
    }

    /// Which user the head upgrades as, or the rejection.
    fn outcome(target: &str, extra: &str, origins: &[String]) -> Result<String, Rejection> {
        let head = upgrade_head(target, extra);
        match decide_with_cookie(head.as_bytes(), origins, Some("jwt"), &NO_LOAD) {
            Decision::Upgrade(upgrade) => Ok(upgrade.user_id),
            Decision::Reject(rejection) => Err(rejection),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_valid_token_and_cookies_only_from_a_listed_origin() {
        let listed = ["https://app.example".to_string()];
        let origin = "Origin: https://app.example\r\n";
        let (good, other) = (token("cookie-user"), token("query-user"));
        let query = format!("/ws?token={other}");
        let cases: Vec<(String, &str, Result<&str, Rejection>)> = vec![
            (
                format!("{origin}Cookie: jwt={good}\r\n"),
                "/ws",
                Ok("cookie-user"),
            ),
            // No Origin: the cookie is passed over.
            (
                format!("Cookie: jwt={good}\r\n"),
                "/ws",
                Err(Rejection::OriginNotAllowed),
            ),
            (format!("Cookie: jwt={good}\r\n"), &query, Ok("query-user")),
            // A stale cookie does not hide the next source or cookie.
            (
                format!("{origin}Cookie: jwt=garbage\r\n"),
                &query,
                Ok("query-user"),
            ),
            (
                format!("{origin}Cookie: jwt=; jwt={good}\r\n"),
                "/ws",
                Ok("cookie-user"),
            ),
            (
                format!("{origin}Cookie: jwt=garbage\r\n"),
                "/ws",
                Err(Rejection::InvalidToken),
            ),
            (
                "Authorization: Bearer x.y.z\r\n".to_string(),
                &query,
                Ok("query-user"),
            ),
            (
                "Authorization: Basic eDp5\r\n".to_string(),
                "/ws",
                Err(Rejection::MissingToken),
            ),
            // No Origin is a non-browser client: let through.
            (String::new(), &query, Ok("query-user")),
            (
                "Origin: https://evil.example\r\n".to_string(),
                &query,
                Err(Rejection::OriginNotAllowed),
            ),
        ];
        for (extra, target, expected) in cases {
            assert_eq!(
                outcome(target, &extra, &listed),
                expected.map(str::to_owned),
                "{target} with {extra:?}"
            );
        }
    }

    #[test]
    fn oversized_heads() {
        let mut big = b"GET /ws HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(rejection(&big), Some(Rejection::HeadTooLarge));
        let mut many = b"GET /ws HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(rejection(&many), Some(Rejection::HeadTooLarge));
        assert_eq!(
            rejection(b"GET /ws HTTP/1.1\r\nBad\0Header: x\r\n\r\n"),
            Some(Rejection::BadRequest)
        );
    }

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
