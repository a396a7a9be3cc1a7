//! Token refresh in place (README, "Refreshing the token"): the client sends
//! `{"type":"refresh","token":"<jwt>"}` on an open session; a token that passes the
//! upgrade's rules for the same user moves the session's expiry, and the server
//! warns with `token_expiring` `WS_TOKEN_EXPIRY_NOTICE` before `exp`.
//!
//! Runs on the event loop thread. This module owns the parsing of the client's
//! message, the per-session token state (expiry notice, refresh rate window) and
//! the answers; the connection keeps the expiry deadline itself, so the notice and
//! the 4001 close stay in its one timer entry. A refresh is rare (once per token
//! lifetime), so its answers are built with ordinary allocations, off the hot path.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use crate::auth::{AuthError, Authenticator, Identity};
use crate::clock::{self, Timestamp};
use crate::message::{Frame, write_text_frame_header};

/// Largest refresh message accepted, whatever `WS_MAX_MESSAGE_SIZE` says: room for
/// a token of the size the upgrade accepts (an RS256 token with many claims is
/// one to two KiB).
pub const MAX_REFRESH_BYTES: usize = 8 * 1024;
/// Refreshes a session may ask for per [`REFRESH_WINDOW`]; the rest are answered
/// `too many refreshes` without a signature check. A well-behaved client refreshes
/// once per token lifetime, and a few retries fit.
pub const MAX_REFRESHES_PER_WINDOW: u8 = 10;
/// The rate window of [`MAX_REFRESHES_PER_WINDOW`].
pub const REFRESH_WINDOW: Duration = Duration::from_secs(60);

/// The error a refused token gets (the same text as a refused upgrade).
const INVALID_TOKEN: &str = "invalid or expired token";
/// The error a refresh past the rate gets.
const TOO_MANY: &str = "too many refreshes";

/// If `text` is a refresh request, its token (empty when the `token` member is
/// missing or not a string: such a request is answered as an invalid token).
/// Anything else (another type, not JSON) is None.
pub fn parse_request(text: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Request<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(default)]
        token: Option<serde_json::Value>,
    }
    // Cheap pre-check: most client messages are not refreshes. Only an object is a
    // request (serde would also take `["refresh"]` for the struct).
    let is_object = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !is_object || !text.windows(7).any(|w| w == b"refresh") {
        return None;
    }
    let request = serde_json::from_slice::<Request<'_>>(text).ok()?;
    if request.kind != "refresh" {
        return None;
    }
    match request.token {
        Some(serde_json::Value::String(token)) => Some(token),
        _ => Some(String::new()),
    }
}

/// Refresh requests read from one session in one read, waiting for the loop to
/// check them. Holds at most the room the session's rate window had left; the
/// rest are only counted. Its `Debug` never shows a token.
#[derive(Default, PartialEq, Eq)]
pub struct Requests {
    tokens: Vec<String>,
    /// Requests past the rate (answered `too many refreshes`).
    refused: usize,
    room: usize,
}

impl Requests {
    /// Collects up to `room` tokens.
    pub fn with_room(room: usize) -> Requests {
        Requests {
            tokens: Vec::new(),
            refused: 0,
            room,
        }
    }

    /// Keeps `token` if there is room, else counts it as refused.
    pub fn push(&mut self, token: String) {
        if self.tokens.len() < self.room {
            self.tokens.push(token);
        } else {
            self.refused += 1;
        }
    }

    /// Whether no request was read.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.refused == 0
    }

    /// Requests read, checked or not.
    pub fn len(&self) -> usize {
        self.tokens.len() + self.refused
    }

    /// Tokens kept to be checked (at most the room).
    pub fn to_check(&self) -> usize {
        self.tokens.len()
    }
}

impl fmt::Debug for Requests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Requests")
            .field("tokens", &self.tokens.len())
            .field("refused", &self.refused)
            .finish()
    }
}

/// The rules a refresh is checked by: the upgrade's authenticator and leeway, and
/// the notice to re-arm.
pub struct Rules<'a> {
    pub authenticator: &'a Authenticator,
    /// `JWT_LEEWAY`: the session closes at `exp` plus this, as after the upgrade.
    pub leeway: Duration,
    /// `WS_TOKEN_EXPIRY_NOTICE`; zero = no notice.
    pub notice: Duration,
}

/// How one refresh request ended, for the metrics and the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The expiry moved.
    Refreshed,
    /// The token did not pass the upgrade's rules.
    Invalid(AuthError),
    /// A valid token for another user.
    OtherUser,
    /// Past [`MAX_REFRESHES_PER_WINDOW`]: not checked.
    TooMany,
}

impl Outcome {
    /// Every label, for the metrics.
    pub const LABELS: [&'static str; 4] = ["refreshed", "invalid", "other_user", "rate_limited"];

    /// Label for logs and metrics (an index into [`Outcome::LABELS`]).
    pub fn index(self) -> usize {
        match self {
            Outcome::Refreshed => 0,
            Outcome::Invalid(_) => 1,
            Outcome::OtherUser => 2,
            Outcome::TooMany => 3,
        }
    }
}

/// A session's token: its `exp`, when `token_expiring` is due, and the refresh
/// rate window. The close deadline itself (`exp` plus leeway) is the session's.
#[derive(Debug)]
pub struct TokenState {
    /// The token's `exp`, unix seconds (the `expires_at` clients see).
    exp: u64,
    /// When `token_expiring` is due; None once sent, or with notices off.
    notice_at: Option<Instant>,
    /// Start of the current rate window; None before the first refresh.
    window_start: Option<Instant>,
    /// Refreshes taken in the current window.
    in_window: u8,
}

impl TokenState {
    /// The state for a token expiring at `exp` (unix seconds), with the notice
    /// `notice` before it (zero = none).
    pub fn new(exp: u64, notice: Duration, now: Instant) -> TokenState {
        TokenState {
            exp,
            notice_at: notice_instant(exp, notice, now),
            window_start: None,
            in_window: 0,
        }
    }

    /// When `token_expiring` is due, if it is still to be sent.
    pub fn notice_at(&self) -> Option<Instant> {
        self.notice_at
    }

    /// The `token_expiring` message if it is due at `now` (then never again for
    /// this token).
    pub fn take_notice(&mut self, now: Instant) -> Option<Frame> {
        if self.notice_at.is_some_and(|at| now >= at) {
            self.notice_at = None;
            Some(expiry_message("token_expiring", self.exp))
        } else {
            None
        }
    }

    /// Refresh requests the window still has room for at `now` (a new window
    /// starts once the last one is over).
    pub fn room(&mut self, now: Instant) -> usize {
        if self
            .window_start
            .is_none_or(|start| now >= start + REFRESH_WINDOW)
        {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        usize::from(MAX_REFRESHES_PER_WINDOW - self.in_window)
    }

    /// Counts the requests `room` allowed that were read.
    pub fn take_room(&mut self, requests: &Requests) {
        let taken = u8::try_from(requests.to_check()).unwrap_or(u8::MAX);
        self.in_window = self
            .in_window
            .saturating_add(taken)
            .min(MAX_REFRESHES_PER_WINDOW);
    }

    /// Checks each request and answers it. A valid token for `user_id` moves
    /// `expires_at` (the session's close deadline) to its `exp` plus leeway and
    /// re-arms the notice; anything else keeps both. `answer` queues each answer
    /// frame; the outcomes are reported to `outcome`.
    pub fn answer(
        &mut self,
        requests: Requests,
        user_id: &str,
        expires_at: &mut Instant,
        rules: &Rules<'_>,
        now: Instant,
        mut answer: impl FnMut(Frame, Outcome),
    ) {
        for token in requests.tokens {
            let outcome = match rules.authenticator.authenticate(&token) {
                Ok(Identity {
                    user_id: token_user,
                    ..
                }) if token_user != user_id => Outcome::OtherUser,
                Ok(identity) => {
                    self.exp = identity.expires_at;
                    *expires_at = expiry_instant(identity.expires_at, rules.leeway, now);
                    // No notice for a token that already expires within the
                    // notice: `refreshed` tells its expiry, and a notice at once
                    // would send a client that refreshes on every notice round
                    // in a loop while its issuer hands out short tokens.
                    self.notice_at = notice_instant(identity.expires_at, rules.notice, now)
                        .filter(|at| *at > now);
                    Outcome::Refreshed
                }
                Err(error) => Outcome::Invalid(error),
            };
            let frame = match outcome {
                Outcome::Refreshed => expiry_message("refreshed", self.exp),
                _ => failure_message(INVALID_TOKEN),
            };
            answer(frame, outcome);
        }
        if requests.refused > 0 {
            // One frame shared by every refused request: a flood costs no more.
            let too_many = failure_message(TOO_MANY);
            for _ in 0..requests.refused {
                answer(too_many.clone(), Outcome::TooMany);
            }
        }
    }
}

/// When a token that expires at `exp` (unix seconds) stops being valid, with
/// `leeway`, on the monotonic clock.
pub fn expiry_instant(exp: u64, leeway: Duration, now: Instant) -> Instant {
    let expiry_millis = exp
        .saturating_mul(1000)
        .saturating_add(leeway.as_millis() as u64);
    let now_millis = clock::unix_millis(SystemTime::now());
    now + Duration::from_millis(expiry_millis.saturating_sub(now_millis))
}

/// `notice` before `exp`, or None when notices are off.
fn notice_instant(exp: u64, notice: Duration, now: Instant) -> Option<Instant> {
    if notice.is_zero() {
        return None;
    }
    let at = expiry_instant(exp, Duration::ZERO, now);
    Some(at.checked_sub(notice).unwrap_or(now).max(now))
}

/// `{"type":"<kind>","payload":{"expires_at":"<exp, RFC 3339>"},"timestamp":..}`
fn expiry_message(kind: &str, exp: u64) -> Frame {
    let expires_at = Timestamp::from_unix_millis(exp.saturating_mul(1000));
    server_message(
        kind,
        &format!(r#"{{"expires_at":"{}"}}"#, expires_at.as_str()),
    )
}

/// `{"type":"refresh_failed","payload":{"error":"<error>"},"timestamp":..}`
fn failure_message(error: &str) -> Frame {
    server_message("refresh_failed", &format!(r#"{{"error":"{error}"}}"#))
}

/// One server text frame; `kind` and `payload` are our own ASCII JSON, nothing
/// from the client.
fn server_message(kind: &str, payload: &str) -> Frame {
    let json = format!(
        r#"{{"type":"{kind}","payload":{payload},"timestamp":"{}"}}"#,
        Timestamp::now().as_str()
    );
    let mut frame = Vec::with_capacity(json.len() + 4);
    write_text_frame_header(json.len(), &mut frame);
    frame.extend_from_slice(json.as_bytes());
    Frame::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_requests_are_recognised() {
        assert_eq!(
            parse_request(br#"{"type":"refresh","token":"a.b.c"}"#).as_deref(),
            Some("a.b.c")
        );
        // Member order, spaces, other members and escapes do not matter.
        assert_eq!(
            parse_request(br#" { "token" : "a\u002eb" , "x": [1], "type" : "refresh" } "#)
                .as_deref(),
            Some("a.b")
        );
        // A refresh without a string token is answered as an invalid token.
        assert_eq!(parse_request(br#"{"type":"refresh"}"#).as_deref(), Some(""));
        assert_eq!(
            parse_request(br#"{"type":"refresh","token":42}"#).as_deref(),
            Some("")
        );
        // Not refreshes.
        for text in [
            &br#"{"type":"ping"}"#[..],
            br#"{"type":"refreshed","token":"t"}"#,
            br#"{"kind":"refresh","token":"t"}"#,
            br#"{"type":"refresh","token":"t""#,
            br#"["refresh"]"#,
            b"refresh",
            b"",
        ] {
            assert_eq!(
                parse_request(text),
                None,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn requests_past_the_room_are_counted_not_kept() {
        let mut requests = Requests::with_room(2);
        for token in ["one", "two", "three", "four"] {
            requests.push(token.to_owned());
        }
        assert_eq!(requests.to_check(), 2);
        assert_eq!(requests.len(), 4);
        let shown = format!("{requests:?}");
        assert!(!shown.contains("one"), "{shown}");
    }

    #[test]
    fn the_rate_window_bounds_checks_and_starts_again() {
        let start = Instant::now();
        let mut state = TokenState::new(0, Duration::ZERO, start);
        let room = state.room(start);
        assert_eq!(room, usize::from(MAX_REFRESHES_PER_WINDOW));
        let mut requests = Requests::with_room(room);
        for _ in 0..room + 3 {
            requests.push(String::new());
        }
        state.take_room(&requests);
        assert_eq!(state.room(start + REFRESH_WINDOW / 2), 0);
        assert_eq!(
            state.room(start + REFRESH_WINDOW),
            usize::from(MAX_REFRESHES_PER_WINDOW)
        );
    }

    #[test]
    fn the_notice_is_due_once_before_exp() {
        let now = Instant::now();
        let exp = clock::unix_secs_now() + 100;
        let mut state = TokenState::new(exp, Duration::from_secs(60), now);
        let at = state.notice_at().expect("armed");
        // About 40 s from now (the clock's sub-second part is not known).
        assert!(at > now + Duration::from_secs(38) && at <= now + Duration::from_secs(40));
        assert!(state.take_notice(at - Duration::from_millis(1)).is_none());
        let frame = state.take_notice(at).expect("due");
        let text = String::from_utf8_lossy(&frame[2..]).into_owned();
        assert!(
            text.starts_with(r#"{"type":"token_expiring","payload":{"expires_at":""#),
            "{text}"
        );
        assert!(state.take_notice(at).is_none(), "sent once");
        // A token that expires within the notice is due at once; notices can be off.
        let soon = TokenState::new(exp, Duration::from_secs(600), now);
        assert_eq!(soon.notice_at(), Some(now));
        assert_eq!(TokenState::new(exp, Duration::ZERO, now).notice_at(), None);
    }

    #[test]
    fn answers_are_single_text_frames_of_json() {
        let frame = failure_message(TOO_MANY);
        assert_eq!(frame[0], 0x81);
        let json: serde_json::Value = serde_json::from_slice(&frame[2..]).expect("JSON");
        assert_eq!(json["type"], "refresh_failed");
        assert_eq!(json["payload"]["error"], "too many refreshes");
        let frame = expiry_message("refreshed", 1_800_000_000);
        let json: serde_json::Value = serde_json::from_slice(&frame[2..]).expect("JSON");
        assert_eq!(json["payload"]["expires_at"], "2027-01-15T08:00:00.000Z");
    }
}
