//! The fuzz checks: one function per target, each taking the raw fuzz input.
//!
//! Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly features through
//! `RUSTC_BOOTSTRAP=1`) and by the stable corpus replay test (`tests/fuzz_corpus.rs`),
//! both through `#[path]`, so CI replays every corpus and artifact file through exactly
//! the code the fuzzer ran. Each check calls the library's own entry points (the code
//! the server runs, not a copy) and panics when a property does not hold.
//!
//! Input layouts (chosen so that seed files can be written by hand; fuzz/README.md
//! has the details):
//! - `handshake`: byte 0 = rules and chunking (bits 0-4 chunk seed, 5 origin list,
//!   6 per-user limit, 7 connection limit reached), then the request bytes.
//! - `frames`: byte 0 = flags (bit 0 discard writes, 1 EOF at the end, 2 small budget,
//!   3 flush output between turns, 4 pipelined head), byte 1 = read-chunking seed, then
//!   the bytes the client sends.
//! - `redis_message`: `<channel>\n<published payload>`.
//! - `token`: byte 0 = mode (bits 0-1 placement, 2-3 signature, 4-5 algorithm, 6
//!   percent-encoding, 7 decoy), then `\n`-separated fields.
//! - `config`: `NAME=value` lines (an env file).
//! - `pubsub_frames`: byte 0 = read-chunking seed (0 = one read), then the bytes
//!   Redis sends the reader's pub/sub link.
//!
//! This file is compiled as a module of other crates (`#[path]`), so it uses only the
//! dependencies the main crate and its tests already have: `ws-notify`, `serde`,
//! `serde_json`, `jsonwebtoken`, `tungstenite`, `base64`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;
use tungstenite::protocol::{Role, WebSocketContext};

use ws_notify::auth::{Authenticator, TokenSources, token_candidates};
use ws_notify::clock::Timestamp;
use ws_notify::config::{Config, VARIABLES, parse_duration};
use ws_notify::conn::handshake::{
    ConnectionCounts, Decision, Endpoints, HandshakeRules, MAX_HEAD_BYTES, evaluate,
};
use ws_notify::conn::outbound::{MAX_CONTROL_BYTES, OutboundQueue};
use ws_notify::conn::refresh::{MAX_REFRESH_BYTES, MAX_REFRESHES_PER_WINDOW, Requests};
use ws_notify::conn::{FramesRead, read_frames, websocket_config};
use ws_notify::message::{MessageEncoder, user_id_from_channel};
use ws_notify::metrics::WriteMetrics;
use ws_notify::pubsub::resp::{self, Frame};

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/`) and its check.
pub const TARGETS: [(&str, Check); 6] = [
    ("handshake", handshake),
    ("frames", frames),
    ("redis_message", redis_message),
    ("token", token),
    ("config", config),
    ("pubsub_frames", pubsub_frames),
];

/// The HMAC secret every target's `Authenticator` is built with; the seed corpus
/// tokens are signed with it.
pub const SECRET: &str = "fuzz-secret-7f3a9c2e-do-not-use";
/// A secret that must never be accepted.
pub const WRONG_SECRET: &str = "fuzz-secret-7f3a9c2e-do-not-usf";
/// `JWT_COOKIE_NAME` in the targets.
pub const COOKIE_NAME: &str = "jwt";
/// The origin allowed when a handshake input asks for an origin list.
pub const ALLOWED_ORIGIN: &str = "https://app.example.com";
/// `REDIS_CHANNEL_PREFIX` (the default).
pub const CHANNEL_PREFIX: &str = "user_noti:";
/// `WS_MAX_MESSAGE_SIZE` (the default), as the server configures tungstenite.
pub const MAX_MESSAGE_SIZE: usize = 512;
/// `read_frames` budget per turn, as the server's `READ_BUDGET`.
const READ_BUDGET: usize = 64;
/// Refresh requests one read may keep for checking: a fresh rate window's room.
const REFRESH_ROOM: usize = MAX_REFRESHES_PER_WINDOW as usize;
/// Most memory the frames read path may hold at once beyond its input: tungstenite's
/// read buffer and one message (bounded by `MAX_REFRESH_BYTES`, the largest a refresh
/// request may be), the control bytes (`MAX_CONTROL_BYTES`), the refresh tokens kept
/// (`REFRESH_ROOM`, each under `MAX_REFRESH_BYTES`), and slack for the allocator's
/// bookkeeping of small buffers.
const FRAMES_MEMORY_BOUND: usize = 64 * 1024 + MAX_CONTROL_BYTES + REFRESH_ROOM * MAX_REFRESH_BYTES;

// --- shared helpers ------------------------------------------------------------

/// splitmix64: a tiny deterministic generator for chunk sizes and blocking points.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A read size: mostly small, sometimes a whole buffer.
    fn chunk(&mut self) -> usize {
        match self.below(8) {
            0..=3 => 1 + self.below(8),
            4 | 5 => 1 + self.below(64),
            6 => 1 + self.below(1024),
            _ => 1024,
        }
    }
}

/// The fuzzer's own allocation counter, per thread (the replay test runs checks on
/// several threads at once): live bytes and the high-water mark since the last reset.
pub struct CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: allocations during thread teardown are simply not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Measures the most memory `f` held at once (bytes above what was live before).
fn peak_memory_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let value = f();
    let peak = PEAK.with(Cell::get);
    (value, (peak - base).max(0) as usize)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `Authenticator` of every target: `JWT_SECRET_KEY` = [`SECRET`], the rest default.
fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let config = Config::from_lookup(|name| match name {
            "JWT_SECRET_KEY" => Some(SECRET.to_owned()),
            "JWT_COOKIE_NAME" => Some(COOKIE_NAME.to_owned()),
            "WS_ALLOWED_ORIGINS" => Some(ALLOWED_ORIGIN.to_owned()),
            _ => None,
        })
        .expect("the fuzz configuration is valid");
        Authenticator::new(&config.jwt).expect("the fuzz secret is usable")
    })
}

/// Base64url without padding (RFC 7515 section 2), as jsonwebtoken writes it.
const BASE64URL: GeneralPurpose = URL_SAFE_NO_PAD;

/// Base64url without padding that also accepts non-zero trailing bits (jsonwebtoken
/// does not, so a token it accepted always decodes here).
const BASE64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

fn base64url_encode(input: &[u8]) -> String {
    BASE64URL.encode(input)
}

fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    BASE64URL_LENIENT.decode(input).ok()
}

// --- handshake -------------------------------------------------------------------

/// Fixed live counts for the limits.
struct FixedCounts {
    open: usize,
    per_user: usize,
}

impl ConnectionCounts for FixedCounts {
    fn open_connections(&self) -> usize {
        self.open
    }

    fn connections_of(&self, _user_id: &str) -> usize {
        self.per_user
    }
}

/// The request head as the server reads it: delivered in chunks (one chunk per
/// readable event), `evaluate` after each, up to `MAX_HEAD_BYTES + 1` bytes
/// (`Connection::fill_head`), stopping at the first decision that is not `NeedMore`.
pub fn handshake(data: &[u8]) {
    let Some((&control, request)) = data.split_first() else {
        return;
    };
    let origins = [ALLOWED_ORIGIN.to_owned()];
    let rules = HandshakeRules {
        authenticator: authenticator(),
        allowed_origins: if control & 0x20 != 0 { &origins } else { &[] },
        cookie_name: Some(COOKIE_NAME),
        max_connections: 100,
        max_connections_per_user: if control & 0x40 != 0 { 2 } else { 0 },
        endpoints: Endpoints::All,
    };
    let counts = FixedCounts {
        open: if control & 0x80 != 0 { 100 } else { 7 },
        per_user: 1,
    };
    let limit = MAX_HEAD_BYTES + 1;
    let seed = control & 0x1f;
    let mut rng = Rng::new(u64::from(seed));
    let mut buf: Vec<u8> = Vec::new();
    let mut offered = 0;
    let mut decision = Decision::NeedMore;
    let mut evaluations = 0;
    while offered < request.len() && buf.len() < limit {
        // Seed 0: everything arrives before the first readable event.
        let want = if seed == 0 { usize::MAX } else { rng.chunk() };
        let n = want.min(request.len() - offered).min(limit - buf.len());
        buf.extend_from_slice(&request[offered..offered + n]);
        offered += n;
        decision = evaluate(&buf, &rules, &counts);
        evaluations += 1;
        if decision != Decision::NeedMore {
            break;
        }
    }
    assert!(buf.len() <= limit, "read past the head limit");
    assert!(evaluations <= request.len().max(1));
    if buf.len() >= limit {
        assert_ne!(
            decision,
            Decision::NeedMore,
            "NeedMore with {} bytes: the connection would wait for bytes it never reads",
            buf.len()
        );
    }
    if let Decision::Upgrade(upgrade) = &decision {
        assert!(upgrade.head_len > 0, "empty head upgraded");
        assert!(
            upgrade.head_len <= buf.len(),
            "head_len {} past the {} bytes read",
            upgrade.head_len,
            buf.len()
        );
        assert!(
            upgrade.head_len <= MAX_HEAD_BYTES,
            "head_len past the limit"
        );
        // httparse ends a head at an empty line after any line ending (`\n\n`,
        // `\n\r\n`).
        assert!(
            buf[..upgrade.head_len].ends_with(b"\n\n")
                || buf[..upgrade.head_len].ends_with(b"\n\r\n"),
            "head_len does not end at the blank line"
        );
        assert!(!upgrade.user_id.is_empty(), "upgrade without a user");
        assert_eq!(upgrade.accept_key.len(), 28, "Sec-WebSocket-Accept length");
        assert!(
            upgrade.expires_at + 1 >= unix_now(),
            "upgrade with an expired token"
        );
    }
    // `evaluate` is a pure function of the bytes read so far: the same bytes in a
    // single read give the same answer however they were chunked.
    let whole = &request[..request.len().min(limit)];
    let one_shot = evaluate(whole, &rules, &counts);
    match (&decision, &one_shot) {
        (Decision::Upgrade(a), Decision::Upgrade(b)) => {
            assert_eq!(a.head_len, b.head_len, "chunking changed head_len");
            assert_eq!(a.user_id, b.user_id, "chunking changed the user");
        }
        _ => assert_eq!(decision, one_shot, "chunking changed the decision"),
    }
}

// --- frames ----------------------------------------------------------------------

/// The client's side of the socket: hands out `data` in arbitrary pieces, with
/// `WouldBlock` (and `Interrupted`) at arbitrary points, then `WouldBlock` (an idle
/// open connection) or EOF.
struct ScriptedSocket<'a> {
    data: &'a [u8],
    pos: usize,
    rng: Rng,
    eof_at_end: bool,
    /// The previous read was an interruption: the next one makes progress.
    just_blocked: bool,
}

impl ScriptedSocket<'_> {
    fn exhausted(&self) -> bool {
        self.pos == self.data.len()
    }
}

impl Read for ScriptedSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.exhausted() {
            return if self.eof_at_end {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        if !self.just_blocked && !buf.is_empty() {
            match self.rng.below(16) {
                0..=2 => {
                    self.just_blocked = true;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                3 => {
                    self.just_blocked = true;
                    return Err(io::ErrorKind::Interrupted.into());
                }
                _ => {}
            }
        }
        self.just_blocked = false;
        let n = self
            .rng
            .chunk()
            .min(buf.len())
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Checks what the read path queued for the client: only whole, unmasked control
/// frames (pong, close), at most one close, nothing after it.
fn check_control_output(bytes: &[u8], close_seen: &mut bool) {
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(!*close_seen, "bytes queued after a close frame");
        assert!(rest.len() >= 2, "truncated control frame {rest:?}");
        assert_eq!(rest[0] & 0xf0, 0x80, "control frame: FIN set, RSV clear");
        let opcode = rest[0] & 0x0f;
        assert!(
            opcode == 0x8 || opcode == 0xa,
            "the read path queued opcode {opcode:#x}"
        );
        assert_eq!(rest[1] & 0x80, 0, "a server must not mask (RFC 6455 5.1)");
        let len = usize::from(rest[1] & 0x7f);
        assert!(len <= 125, "control frame payload {len} > 125");
        assert!(rest.len() >= 2 + len, "truncated control frame");
        let payload = &rest[2..2 + len];
        if opcode == 0x8 {
            *close_seen = true;
            assert_ne!(len, 1, "close payload of one byte");
            if len >= 2 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                assert!(
                    (1000..5000).contains(&code) && ![1004, 1005, 1006, 1015].contains(&code),
                    "close code {code} may not be sent"
                );
                assert!(
                    std::str::from_utf8(&payload[2..]).is_ok(),
                    "close reason not UTF-8"
                );
            }
        }
        rest = &rest[2 + len..];
    }
}

/// Bytes from a client as the server's read path sees them on an open connection:
/// `read_frames` with the server's WebSocket configuration, called again after each
/// `WouldBlock` or spent budget (the next readable event or loop turn).
pub fn frames(data: &[u8]) {
    let [flags, seed, stream @ ..] = data else {
        return;
    };
    let discard_writes = flags & 0x01 != 0;
    let eof_at_end = flags & 0x02 != 0;
    let budget = if flags & 0x04 != 0 {
        1 + usize::from(seed % 3)
    } else {
        READ_BUDGET
    };
    let flush_between = flags & 0x08 != 0;
    let config = websocket_config(MAX_MESSAGE_SIZE);
    let mut rng = Rng::new(u64::from(*seed));
    // Bytes that arrived with the request head reach the context pre-read, as in
    // `Connection::open`.
    let (pipelined, stream) = if flags & 0x10 != 0 {
        stream.split_at(rng.below(stream.len() + 1))
    } else {
        (&[][..], stream)
    };
    let mut ws = if pipelined.is_empty() {
        WebSocketContext::new(Role::Server, Some(config))
    } else {
        WebSocketContext::from_partially_read(pipelined.to_vec(), Role::Server, Some(config))
    };
    let mut socket = ScriptedSocket {
        data: stream,
        pos: 0,
        rng,
        eof_at_end,
        just_blocked: false,
    };
    let mut out = OutboundQueue::default();
    let mut sent: Vec<u8> = Vec::with_capacity(MAX_CONTROL_BYTES);
    let mut close_seen = false;
    let mut flushed_total = 0;
    // Every turn reads bytes, delivers a message, or ends after one interruption:
    // more turns than that is a hang.
    let max_turns = 2 * (pipelined.len() + stream.len()) + 16;
    let ((), peak) = peak_memory_of(|| {
        let mut turns = 0;
        loop {
            turns += 1;
            assert!(turns <= max_turns, "read_frames made no progress");
            let mut refreshes = Requests::with_room(REFRESH_ROOM);
            let report = read_frames(
                &mut ws,
                &mut socket,
                &mut out,
                budget,
                discard_writes,
                MAX_MESSAGE_SIZE,
                &mut refreshes,
            );
            assert_eq!(out.messages(), 0, "the read path queued a message frame");
            assert!(
                refreshes.len() + report.ping_requests <= budget,
                "more requests than messages read"
            );
            assert!(
                refreshes.to_check() <= REFRESH_ROOM,
                "refresh tokens kept past the room"
            );
            assert!(
                report.ping_requests <= budget,
                "more pings than messages read"
            );
            if flush_between {
                sent.clear();
                let (written, _) = out
                    .flush(&mut sent, &mut WriteMetrics::default())
                    .expect("a Vec takes everything");
                assert_eq!(written, sent.len());
                assert!(
                    written <= MAX_CONTROL_BYTES,
                    "control bytes past their bound"
                );
                flushed_total += written;
                check_control_output(&sent, &mut close_seen);
            }
            match report.result {
                FramesRead::Closed(reason) => {
                    if let Some((code, _)) = reason.close_frame() {
                        assert!(
                            [1001, 1002, 1007, 1009, 1011, 4001, 4008].contains(&code),
                            "close code {code} for {reason:?}"
                        );
                    }
                    break;
                }
                FramesRead::BudgetSpent => {}
                FramesRead::WouldBlock if socket.exhausted() => {
                    assert!(!eof_at_end, "EOF reported as WouldBlock");
                    break;
                }
                FramesRead::WouldBlock => {}
            }
        }
        if !flush_between {
            sent.clear();
            let (written, _) = out
                .flush(&mut sent, &mut WriteMetrics::default())
                .expect("a Vec takes everything");
            assert!(
                written <= MAX_CONTROL_BYTES,
                "control bytes past their bound"
            );
            flushed_total += written;
            check_control_output(&sent, &mut close_seen);
        }
    });
    // Memory bounded by the configured limits, whatever the client sends.
    assert!(
        peak <= FRAMES_MEMORY_BOUND,
        "the read path held {peak} bytes at once (bound {FRAMES_MEMORY_BOUND})"
    );
    if discard_writes {
        assert_eq!(flushed_total, 0, "writes queued while discarding");
    }
}

// --- redis_message ---------------------------------------------------------------

/// An independent reading of a published message (same JSON parser, different code
/// path): what the encoder must have decided.
enum Published {
    NotJson,
    NotAnObject,
    Object(Vec<(String, Box<RawValue>)>),
}

/// Collects an object's entries in order, duplicates included.
struct Entries;

impl<'de> Visitor<'de> for Entries {
    type Value = Vec<(String, Box<RawValue>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value = map.next_value::<Box<RawValue>>()?;
            entries.push((key.into_owned(), value));
        }
        Ok(entries)
    }
}

fn classify_published(published: &[u8]) -> Published {
    let Ok(text) = std::str::from_utf8(published) else {
        return Published::NotJson;
    };
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else {
        return Published::NotJson;
    };
    let first = raw.get().trim_start().as_bytes().first().copied();
    if first != Some(b'{') {
        // A top-level scalar is parsed, not skipped: a number out of f64 range
        // (`1e400`) or a string with a lone surrogate escape (`"\\ud800"`) is not
        // JSON to the encoder, while the same inside an array or a payload is only
        // scanned (and passed through: both are valid JSON grammar).
        let scalar = matches!(first, Some(b'-' | b'0'..=b'9' | b'"'));
        return if scalar && serde_json::from_str::<serde_json::Value>(raw.get()).is_err() {
            Published::NotJson
        } else {
            Published::NotAnObject
        };
    }
    // Keys are unescaped (values only scanned): a key with a lone surrogate escape
    // (`"\\ud800x"`) is not JSON to the encoder either.
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match de::Deserializer::deserialize_map(&mut de, Entries) {
        Ok(entries) => Published::Object(entries),
        Err(_) => Published::NotJson,
    }
}

/// Decodes a server frame: (FIN, opcode, masked, payload); asserts a minimal,
/// exact length.
fn decode_server_frame(frame: &[u8]) -> (bool, u8, bool, &[u8]) {
    assert!(frame.len() >= 2, "frame shorter than a header");
    assert_eq!(frame[0] & 0x70, 0, "RSV bits set");
    let (len, start) = match frame[1] & 0x7f {
        126 => {
            assert!(frame.len() >= 4);
            let len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
            assert!(len > 125, "16-bit length not minimal");
            (len, 4)
        }
        127 => {
            assert!(frame.len() >= 10);
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[2..10]);
            let len = u64::from_be_bytes(b);
            assert!(len > u64::from(u16::MAX), "64-bit length not minimal");
            assert!(len >> 63 == 0, "64-bit length with the top bit set");
            (len as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    assert_eq!(
        frame.len(),
        start + len,
        "frame length does not match its header"
    );
    (
        frame[0] & 0x80 != 0,
        frame[0] & 0x0f,
        frame[1] & 0x80 != 0,
        &frame[start..],
    )
}

/// The keys of a client message, borrowed raw (`id` only for a message
/// published with history).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage<'a> {
    #[serde(borrow)]
    #[allow(dead_code)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow)]
    kind: &'a RawValue,
    #[serde(borrow)]
    payload: &'a RawValue,
    timestamp: String,
}

/// A published message as the server takes it from Redis: the channel names the
/// user, the payload is validated and encoded once into a text frame.
pub fn redis_message(data: &[u8]) {
    let (channel, published) = match data.iter().position(|&b| b == b'\n') {
        Some(newline) => (&data[..newline], &data[newline + 1..]),
        None => (&b"user_noti:fuzz-user"[..], data),
    };
    // The reader checks the channel is UTF-8 once, then takes the id from the `str`.
    let user_id = std::str::from_utf8(channel)
        .ok()
        .and_then(|channel| user_id_from_channel(channel, CHANNEL_PREFIX));
    match user_id {
        Some(user_id) => {
            assert!(!user_id.is_empty(), "empty user id accepted");
            assert_eq!(
                [CHANNEL_PREFIX.as_bytes(), user_id.as_bytes()].concat(),
                channel,
                "user id is not the channel after the prefix"
            );
        }
        None => {
            let id = channel.strip_prefix(CHANNEL_PREFIX.as_bytes());
            assert!(
                id.is_none_or(|id| id.is_empty() || std::str::from_utf8(id).is_err()),
                "a valid channel was refused"
            );
        }
    }

    // Any time up to the year 9999, derived from the input.
    let millis = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) % 253_402_300_800_000;
    let timestamp = Timestamp::from_unix_millis(millis);
    let ts = timestamp.as_str();
    assert_eq!(ts.len(), 24, "timestamp {ts:?}");
    assert!(ts.ends_with('Z') && ts.is_ascii(), "timestamp {ts:?}");

    let mut encoder = MessageEncoder::new();
    let result = encoder.encode_published(published, &timestamp);
    let expected = match classify_published(published) {
        Published::NotJson => Err("not_json"),
        Published::NotAnObject => Err("not_an_object"),
        Published::Object(entries) => {
            let kinds: Vec<&RawValue> = entries
                .iter()
                .filter(|(k, _)| k == "type")
                .map(|(_, v)| &**v)
                .collect();
            let payloads: Vec<&RawValue> = entries
                .iter()
                .filter(|(k, _)| k == "payload")
                .map(|(_, v)| &**v)
                .collect();
            let ids: Vec<&RawValue> = entries
                .iter()
                .filter(|(k, _)| k == "id")
                .map(|(_, v)| &**v)
                .collect();
            // A string `id` (added by the history function) goes first; any other is ignored.
            let id_member = ids
                .first()
                .filter(|id| id.get().starts_with('"'))
                .map_or(String::new(), |id| format!(r#""id":{},"#, id.get()));
            if kinds.len() > 1 || payloads.len() > 1 || ids.len() > 1 {
                Err("not_json")
            } else if kinds.is_empty() {
                Err("missing_type")
            } else if !kinds[0].get().starts_with('"') {
                Err("type_not_string")
            } else {
                Ok(format!(
                    r#"{{{id_member}"type":{},"payload":{},"timestamp":"{ts}"}}"#,
                    kinds[0].get(),
                    payloads.first().map_or("null", |p| p.get()),
                ))
            }
        }
    };
    match (result, expected) {
        (Ok(frame), Ok(expected_json)) => {
            let (fin, opcode, masked, payload) = decode_server_frame(&frame);
            assert!(
                fin && opcode == 1 && !masked,
                "not an unmasked final text frame"
            );
            let text = std::str::from_utf8(payload).expect("a text frame is UTF-8");
            assert_eq!(text, expected_json, "frame text");
            let message: ClientMessage<'_> =
                serde_json::from_str(text).expect("the frame payload is one JSON object");
            assert!(message.kind.get().starts_with('"'));
            assert_eq!(message.timestamp, ts);
            // The payload is passed through byte for byte.
            let published_payload = match classify_published(published) {
                Published::Object(entries) => entries
                    .into_iter()
                    .find(|(k, _)| k == "payload")
                    .map(|(_, v)| v.get().to_owned()),
                _ => unreachable!("classified as an object above"),
            };
            assert_eq!(
                message.payload.get(),
                published_payload.as_deref().unwrap_or("null"),
                "payload not passed through unchanged"
            );
        }
        (Err(reason), Err(expected)) => assert_eq!(reason.as_str(), expected, "refusal reason"),
        (Ok(_), Err(expected)) => panic!("accepted a message that is {expected}"),
        (Err(reason), Ok(_)) => panic!("refused a valid message as {reason}"),
    }
}

// --- token -----------------------------------------------------------------------

const ALGORITHMS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// What a check of an accepted token requires, recomputed without the `Authenticator`:
/// three parts, an HMAC `alg`, a signature that verifies with [`SECRET`], an `exp`
/// that has not passed and a non-empty string `sub` equal to the identity.
fn assert_genuine(token: &str, user_id: &str, expires_at: u64) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted a token of {} parts", parts.len());
    let header: serde_json::Map<String, serde_json::Value> = base64url_decode(parts[0])
        .and_then(|h| serde_json::from_slice(&h).ok())
        .expect("accepted a token whose header is not a JSON object");
    let alg = match header.get("alg").and_then(serde_json::Value::as_str) {
        Some("HS256") => Algorithm::HS256,
        Some("HS384") => Algorithm::HS384,
        Some("HS512") => Algorithm::HS512,
        other => panic!("accepted alg {other:?}"),
    };
    assert!(header.get("crit").is_none(), "accepted a crit header");
    let message = format!("{}.{}", parts[0], parts[1]);
    assert_eq!(
        jsonwebtoken::crypto::verify(
            parts[2],
            message.as_bytes(),
            &DecodingKey::from_secret(SECRET.as_bytes()),
            alg
        )
        .ok(),
        Some(true),
        "accepted a token not signed with the configured secret"
    );
    let claims: serde_json::Map<String, serde_json::Value> = base64url_decode(parts[1])
        .and_then(|c| serde_json::from_slice(&c).ok())
        .expect("accepted a token whose claims are not a JSON object");
    let exp = claims
        .get("exp")
        .and_then(|exp| {
            exp.as_u64()
                .or_else(|| exp.as_f64().map(|f| f.floor() as u64))
        })
        .expect("accepted a token without a numeric exp");
    assert_eq!(exp, expires_at, "expires_at is not the floor of exp");
    assert!(expires_at >= unix_now(), "accepted an expired token");
    assert_eq!(
        claims.get("sub").and_then(serde_json::Value::as_str),
        Some(user_id),
        "user id is not the sub claim"
    );
    assert!(!user_id.is_empty(), "accepted an empty user id");
}

fn sign(message: &str, secret: &str, alg: Algorithm) -> String {
    jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        alg,
    )
    .expect("HMAC signing cannot fail")
}

/// Percent-encodes the bytes the generator picks (always `%`, `+`, `&`, `#`, space).
fn percent_encode_some(text: &str, rng: &mut Rng) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        let must = matches!(b, b'%' | b'+' | b'&' | b'#' | b' ') || !b.is_ascii_graphic();
        if must || rng.below(4) == 0 {
            let hex = if rng.below(2) == 0 {
                b"0123456789ABCDEF"
            } else {
                b"0123456789abcdef"
            };
            out.push('%');
            out.push(char::from(hex[usize::from(b >> 4)]));
            out.push(char::from(hex[usize::from(b & 0xf)]));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// Whether the canonical form of a valid token: header exactly `alg` (the signing
/// algorithm) and a string `typ`; claims a non-empty string `sub`, an integer `exp`
/// at least a minute ahead, and otherwise only string claims with no meaning to
/// validation. Such a token, signed with the secret, must be accepted.
fn is_canonical(header: &str, claims: &str, alg: Algorithm) -> Option<(String, u64)> {
    let header = unique_object(header)?;
    let alg_name = format!("{alg:?}");
    for (key, value) in &header {
        match key.as_str() {
            "alg" if value.as_str() == Some(alg_name.as_str()) => {}
            "typ" if value.is_string() => {}
            _ => return None,
        }
    }
    header.get("alg")?;
    let claims = unique_object(claims)?;
    let sub = claims.get("sub")?.as_str().filter(|s| !s.is_empty())?;
    let exp = claims.get("exp")?.as_u64()?;
    if exp < unix_now() + 60 || exp >= 1 << 53 {
        return None;
    }
    for (key, value) in &claims {
        match key.as_str() {
            "sub" | "exp" => {}
            "nbf" | "iss" | "aud" | "iat" => return None,
            _ if value.is_string() => {}
            _ => return None,
        }
    }
    Some((sub.to_owned(), exp))
}

/// A JSON object without duplicate keys (which jsonwebtoken's claim structs refuse).
fn unique_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de::Deserializer::deserialize_map(&mut de, Entries).ok()?;
    de.end().ok()?;
    let mut map = serde_json::Map::new();
    for (key, raw) in entries {
        let value = serde_json::from_str(raw.get()).ok()?;
        if map.insert(key, value).is_some() {
            return None;
        }
    }
    Some(map)
}

/// Token extraction and validation. Structured mode builds a token from arbitrary
/// header and claims JSON, signs it (real secret, wrong secret, empty or arbitrary
/// signature) and places it in one source; raw mode passes arbitrary source values.
/// An accepted token must be genuine ([`assert_genuine`]).
pub fn token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut fields = text.splitn(3, '\n');
    let (f0, f1, f2) = (
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
    );
    let auth = authenticator();
    let placement = mode & 0x03;
    if placement == 3 {
        // Raw sources: Authorization value, Cookie value, query string.
        let cookies = [f1.as_bytes()];
        let sources = TokenSources {
            authorization: (!f0.is_empty()).then_some(f0.as_bytes()),
            cookies: if f1.is_empty() { &[] } else { &cookies },
            query: (!f2.is_empty()).then_some(f2.as_bytes()),
        };
        let cookie_name = (mode & 0x40 == 0).then_some(COOKIE_NAME);
        for candidate in token_candidates(&sources, cookie_name) {
            let token = candidate.token;
            assert!(!token.is_empty(), "extracted an empty token");
            if let Ok(identity) = auth.authenticate(&token) {
                assert_genuine(&token, &identity.user_id, identity.expires_at);
            }
        }
        return;
    }

    let alg = match (mode >> 4) & 0x03 {
        3 => serde_json::from_str::<serde_json::Value>(f0)
            .ok()
            .and_then(|h| match h.get("alg")?.as_str()? {
                "HS384" => Some(Algorithm::HS384),
                "HS512" => Some(Algorithm::HS512),
                _ => None,
            })
            .unwrap_or(Algorithm::HS256),
        i => ALGORITHMS[usize::from(i)],
    };
    let body = format!(
        "{}.{}",
        base64url_encode(f0.as_bytes()),
        base64url_encode(f1.as_bytes())
    );
    let signing = (mode >> 2) & 0x03;
    let signature = match signing {
        0 => sign(&body, SECRET, alg),
        1 => sign(&body, WRONG_SECRET, alg),
        2 => String::new(),
        _ => f2.to_owned(),
    };
    let token = format!("{body}.{signature}");

    let mut rng = Rng::new(u64::from(mode) ^ ((data.len() as u64) << 8));
    let decoy = {
        let claims = format!(r#"{{"sub":"decoy","exp":{}}}"#, unix_now() + 3600);
        let body = format!(
            "{}.{}",
            base64url_encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            base64url_encode(claims.as_bytes())
        );
        let signature = sign(&body, SECRET, Algorithm::HS256);
        format!("{body}.{signature}")
    };
    let with_decoy = mode & 0x80 != 0;
    let authorization = format!("Bearer {token}");
    let cookie = match placement {
        1 => format!("theme=dark; {COOKIE_NAME}={token}; lang=en"),
        0 if with_decoy => format!("{COOKIE_NAME}={decoy}"),
        _ => "theme=dark".to_owned(),
    };
    let query = match placement {
        2 if mode & 0x40 != 0 => format!("v=2&token={}", percent_encode_some(&token, &mut rng)),
        2 => format!("token={token}&v=2"),
        _ if with_decoy => format!("token={decoy}"),
        _ => "v=2".to_owned(),
    };
    let cookies = [cookie.as_bytes()];
    let sources = TokenSources {
        authorization: (placement == 0).then_some(authorization.as_bytes()),
        cookies: &cookies,
        query: Some(query.as_bytes()),
    };
    let extracted = token_candidates(&sources, Some(COOKIE_NAME))
        .next()
        .map(|candidate| candidate.token);
    let clean = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if clean || (placement == 2 && mode & 0x40 != 0) {
        assert_eq!(
            extracted.as_deref(),
            Some(token.as_str()),
            "the token in the first source was not the one extracted"
        );
    }
    let Some(extracted) = extracted else {
        return;
    };
    let result = auth.authenticate(&extracted);
    if let Ok(identity) = &result {
        assert_genuine(&extracted, &identity.user_id, identity.expires_at);
        assert!(
            extracted != token || !matches!(signing, 1 | 2),
            "accepted a token signed with the wrong secret or not at all"
        );
    }
    if signing == 0
        && extracted == token
        && let Some((sub, exp)) = is_canonical(f0, f1, alg)
    {
        let identity = result.unwrap_or_else(|e| panic!("refused a valid token: {e}"));
        assert_eq!(
            (identity.user_id.as_str(), identity.expires_at),
            (sub.as_str(), exp)
        );
    }
}

// --- config ----------------------------------------------------------------------

/// Hides the secrets' values while keeping whether they are set.
fn masked(value: &str) -> String {
    "R".repeat(value.chars().count())
}

/// An env file through `Config::from_lookup`, and every value through `parse_duration`.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut vars: Vec<(&str, &str)> = Vec::new();
    for line in text.lines() {
        check_duration(line);
        if let Some((name, value)) = line.split_once('=') {
            check_duration(value);
            vars.retain(|(n, _)| *n != name);
            vars.push((name, value));
        }
    }
    let vars = &vars;
    let lookup = |secret_masked: bool| {
        move |name: &str| {
            let value = vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)?;
            let secret = matches!(name, "JWT_SECRET_KEY" | "REDIS_PASSWORD");
            Some(if secret && secret_masked {
                masked(value)
            } else {
                value.to_owned()
            })
        }
    };
    let result = Config::from_lookup(lookup(false));
    let with_masked_secrets = Config::from_lookup(lookup(true));
    match (&result, &with_masked_secrets) {
        (Ok(config), Ok(masked_config)) => {
            assert!(
                config.ping_interval < config.pong_wait,
                "ping interval not below pong wait"
            );
            assert!(config.max_message_size > 0 && config.max_connections > 0);
            assert!(config.send_buffer > 0 && config.port > 0);
            assert!(config.jwt.secret.is_some() || config.jwt.public_key_file.is_some());
            let _ = config.listen_addr_text();
            assert_eq!(
                format!("{config:?}"),
                format!("{masked_config:?}"),
                "Debug shows a secret"
            );
            if config.jwt.public_key_file.is_none() {
                // Reading a key file named by the input is not the fuzzer's business.
                if let Err(e) = Authenticator::new(&config.jwt) {
                    assert!(VARIABLES.contains(&e.variable), "unknown variable {e}");
                }
            }
        }
        (Err(error), Err(masked_error)) => {
            assert!(
                VARIABLES.contains(&error.variable),
                "error names {:?}, not a variable",
                error.variable
            );
            assert!(!error.message.is_empty(), "error without a message");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("{}: ", error.variable))
            );
            assert_eq!(error, masked_error, "the error message shows a secret");
        }
        _ => panic!("a secret's value (not its presence) changed the outcome"),
    }
}

/// `parse_duration` never panics; what it accepts fits Go's `time.Duration`
/// (`i64` nanoseconds) and reads back the same from its nanosecond count.
fn check_duration(text: &str) {
    if let Ok(duration) = parse_duration(text) {
        assert!(
            duration.as_nanos() <= i64::MAX as u128,
            "{text:?} -> {duration:?} overflows a Go duration"
        );
        let nanos = format!("{}ns", duration.as_nanos());
        assert_eq!(parse_duration(&nanos), Ok(duration), "{nanos} round trip");
    }
}

// --- pubsub_frames ---------------------------------------------------------------

/// How a run of `pubsub::resp::parse` over a byte stream ended.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    /// Every byte was taken by complete frames.
    Done,
    /// The last `n` bytes are the start of an unfinished frame.
    Incomplete(usize),
    /// A protocol error at this offset (the link drops).
    Error(usize, resp::ProtocolError),
}

/// Parses `data` as the link does: frames are taken from the front of a buffer
/// that grows by one read at a time (`reads` gives the sizes; `None` = all at
/// once). Returns the frames (as their `Debug` text) and how the stream ended.
fn parse_stream(data: &[u8], mut reads: impl FnMut() -> usize) -> (Vec<String>, StreamEnd) {
    let mut frames = Vec::new();
    let mut start = 0;
    let mut end = 0;
    while end < data.len() {
        end = (end + reads().max(1)).min(data.len());
        loop {
            match resp::parse(&data[start..end]) {
                Ok(Some((frame, used))) => {
                    assert!(
                        used > 0 && used <= end - start,
                        "{used} bytes taken of {}",
                        end - start
                    );
                    if let Frame::Message {
                        channel, payload, ..
                    } = frame
                    {
                        assert!(channel.len() + payload.len() < used);
                    }
                    frames.push(format!("{frame:?}"));
                    start += used;
                }
                Ok(None) => break,
                Err(error) => return (frames, StreamEnd::Error(start, error)),
            }
        }
    }
    let end = if start == data.len() {
        StreamEnd::Done
    } else {
        StreamEnd::Incomplete(data.len() - start)
    };
    (frames, end)
}

/// The pub/sub link's parser (`pubsub::resp::parse`): never panics, takes at
/// least one byte per frame and never more than it has, and splitting the
/// stream into reads does not change the frames nor where and how it ends.
pub fn pubsub_frames(data: &[u8]) {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = parse_stream(bytes, || usize::MAX);
    let mut rng = Rng::new(u64::from(seed));
    let split = parse_stream(bytes, || if seed == 0 { 1 } else { rng.chunk() });
    assert_eq!(whole, split, "splitting the reads changed the parse");
}
