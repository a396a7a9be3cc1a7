//! Logging: the `log` facade, filtered like `env_logger` (`LOGGER_LEVEL`, refined
//! per module by `RUST_LOG`), one line per record, either a JSON object
//! (`LOGGER_ENCODING=json`, the default, shaped like the Go service's Zap lines) or
//! plain text for a terminal (`console`, with control characters escaped so that
//! no value from outside can start a line of its own). Facts travel as the `log`
//! crate's key-values (`info!(user_id = id; "client connected")`): JSON members
//! beside a short `message`, or `key=value` after the message on a console. Also
//! [`RateLimited`], for warnings that could otherwise repeat once per message.
//!
//! Writing never blocks the thread that logs: a record is formatted on that thread
//! and appended to a bounded buffer, which the `log-writer` thread drains to
//! stderr. A stalled log consumer (a full pipe, a stuck container log driver) then
//! costs lines, not the event loop: lines that do not fit are dropped and counted
//! ([`dropped_lines`], exported in `/metrics`). [`flush`] waits, briefly, for what
//! is buffered to be written; the process calls it before it exits.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use log::kv::{self, Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

use crate::clock::Timestamp;
use crate::config::LogEncoding;

/// Bytes of formatted lines waiting for the writer thread at most; a line that
/// does not fit is dropped (about 2,000 lines of a typical length).
const LOG_BUFFER_BYTES: usize = 256 * 1024;
/// How long [`flush`] waits for the writer before giving up (a stalled consumer
/// must not hold the process's exit forever).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Lines dropped because the buffer was full.
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);
/// The buffer shared by every logging thread and the writer thread.
static SINK: OnceLock<LogSink> = OnceLock::new();

/// Installs the global logger: `level` for everything, refined by `RUST_LOG`
/// when that is set, each record written to stderr in `encoding` by the
/// `log-writer` thread.
pub fn init(level: LevelFilter, encoding: LogEncoding) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(filters) = std::env::var("RUST_LOG")
        && !filters.is_empty()
    {
        builder.parse_filters(&filters);
    }
    let filter = builder.build();
    let max_level = filter.filter();
    let sink = SINK.get_or_init(LogSink::default);
    if log::set_boxed_logger(Box::new(Logger {
        filter,
        encoding,
        sink,
    }))
    .is_err()
    {
        // A logger is already installed (a second call, or a test harness that set
        // one up); keeping the first one is what we want.
        return;
    }
    log::set_max_level(max_level);
    if let Err(e) = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || sink.write_until_closed(&mut io::stderr()))
    {
        // Without the thread, lines would pile up unwritten: say so where it can be seen.
        eprintln!("ws-notify: cannot start the log writer thread: {e}");
    }
}

/// Lines dropped so far because the log buffer was full (a slow log consumer).
pub fn dropped_lines() -> u64 {
    DROPPED_LINES.load(Ordering::Relaxed)
}

/// Waits (at most a couple of seconds) until every line logged so far is written.
/// Called before the process exits, so the last lines are not lost.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush(FLUSH_WAIT);
    }
}

/// The installed `log::Log`: filters, formats on the calling thread, hands the
/// line to the sink.
struct Logger {
    filter: env_logger::Logger,
    encoding: LogEncoding,
    sink: &'static LogSink,
}

thread_local! {
    /// Each thread formats its lines into its own reused buffer.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let time = Timestamp::now();
        let format = |line: &mut Vec<u8>| {
            line.clear();
            // Formatting into a Vec fails only if a Display impl fails; drop the line then.
            if write_record(line, self.encoding, time.as_str(), record).is_ok() {
                self.sink.push(line);
            }
        };
        // A Display impl that logs would find the buffer borrowed: it gets a fresh one.
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => format(&mut line),
            Err(_) => format(&mut Vec::new()),
        });
    }

    fn flush(&self) {
        self.sink.flush(FLUSH_WAIT);
    }
}

/// Formatted lines waiting to be written, bounded by `LOG_BUFFER_BYTES`.
#[derive(Default)]
struct LogSink {
    state: Mutex<SinkState>,
    /// The writer waits here for lines.
    work: Condvar,
    /// `flush` waits here for the writer to finish.
    written: Condvar,
}

#[derive(Default)]
struct SinkState {
    pending: Vec<u8>,
    /// The writer is waiting on `work` (so a push must wake it).
    writer_idle: bool,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// Waiting callers of `flush` (so the writer must signal `written`).
    flushers: usize,
}

impl LogSink {
    fn lock(&self) -> MutexGuard<'_, SinkState> {
        // A panic while holding the lock leaves plain bytes behind; keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one line, or drops and counts it when the buffer is full. Never waits
    /// for I/O: the lock is only ever held for a copy or a swap.
    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        if state.pending.len() + line.len() > LOG_BUFFER_BYTES {
            drop(state);
            DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.pending.extend_from_slice(line);
        if state.writer_idle {
            state.writer_idle = false;
            drop(state);
            self.work.notify_one();
        }
    }

    /// The writer thread: takes the whole buffer at once and writes it outside the
    /// lock. Runs for the life of the process.
    fn write_until_closed(&self, out: &mut impl Write) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.lock();
            state.writing = false;
            if state.flushers > 0 {
                self.written.notify_all();
            }
            while state.pending.is_empty() {
                state.writer_idle = true;
                state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.writer_idle = false;
            state.writing = true;
            std::mem::swap(&mut state.pending, &mut batch);
            drop(state);
            // Nowhere to report a failed write to stderr; the next batch tries again.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > LOG_BUFFER_BYTES {
                // A burst grew it past the bound (one long line); give the memory back.
                batch = Vec::new();
            }
        }
    }

    /// Waits until the buffer is empty and the writer idle, or `limit` passes.
    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        state.flushers += 1;
        while !state.pending.is_empty() || state.writing {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if state.writer_idle {
                state.writer_idle = false;
                self.work.notify_one();
            }
            state = self
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.flushers -= 1;
    }
}

/// Writes one log line (with its trailing newline) for `record` to `out`.
/// The logger and the tests both go through here.
///
/// JSON: `{"time":"…","level":"info","target":"ws_notify::server","message":"…"}`
/// followed by one member per key-value of the record (numbers and booleans as
/// JSON numbers and booleans, anything else as a string).
/// Console: `2026-11-28T03:30:23.123Z INFO  ws_notify::server message key=value`,
/// a value with a space, `"` or `=` in quotes, and every control character
/// escaped (`\n`, `\u{1b}`, ...), so a value from outside (a user id, a channel,
/// an origin) cannot forge a line or drive a terminal.
pub(crate) fn write_record(
    out: &mut impl Write,
    encoding: LogEncoding,
    time: &str,
    record: &Record<'_>,
) -> io::Result<()> {
    match encoding {
        LogEncoding::Json => {
            out.write_all(b"{\"time\":\"")?;
            write_escaped(out, Escape::Json, time)?;
            out.write_all(b"\",\"level\":\"")?;
            out.write_all(json_level(record.level()).as_bytes())?;
            out.write_all(b"\",\"target\":\"")?;
            write_escaped(out, Escape::Json, record.target())?;
            out.write_all(b"\",\"message\":\"")?;
            // The message is formatted straight into the escaper: no String per record.
            write_escaped(out, Escape::Json, *record.args())?;
            out.write_all(b"\"")?;
            write_key_values(out, encoding, record)?;
            out.write_all(b"}\n")
        }
        LogEncoding::Console => {
            write_escaped(
                out,
                Escape::Console,
                format_args!(
                    "{} {:<5} {} {}",
                    time,
                    record.level().as_str(),
                    record.target(),
                    record.args()
                ),
            )?;
            write_key_values(out, encoding, record)?;
            out.write_all(b"\n")
        }
    }
}

/// Writes the record's key-values in `encoding`, each after the ones before it.
fn write_key_values(
    out: &mut impl Write,
    encoding: LogEncoding,
    record: &Record<'_>,
) -> io::Result<()> {
    let mut writer = PairWriter {
        out,
        encoding,
        error: None,
    };
    match record.key_values().visit(&mut writer) {
        Ok(()) => Ok(()),
        Err(_) => Err(writer
            .error
            .unwrap_or_else(|| io::Error::other("formatting a log line failed"))),
    }
}

/// A `VisitSource` that writes each pair as a JSON member or a console `key=value`.
struct PairWriter<'a, W: Write> {
    out: &'a mut W,
    encoding: LogEncoding,
    error: Option<io::Error>,
}

impl<'kvs, W: Write> VisitSource<'kvs> for PairWriter<'_, W> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let written = match self.encoding {
            LogEncoding::Json => write_json_pair(self.out, key.as_str(), &value),
            LogEncoding::Console => write_console_pair(self.out, key.as_str(), &value),
        };
        written.map_err(|error| {
            self.error = Some(error);
            kv::Error::msg("writing a log line failed")
        })
    }
}

/// `,"key":value`: integers, finite floats and booleans bare, the rest a string.
fn write_json_pair(out: &mut impl Write, key: &str, value: &Value<'_>) -> io::Result<()> {
    out.write_all(b",\"")?;
    write_escaped(out, Escape::Json, key)?;
    out.write_all(b"\":")?;
    if let Some(flag) = value.to_bool() {
        out.write_all(if flag { b"true" } else { b"false" })
    } else if let Some(n) = value.to_u64() {
        write!(out, "{n}")
    } else if let Some(n) = value.to_i64() {
        write!(out, "{n}")
    } else if let Some(x) = value.to_f64().filter(|x| x.is_finite()) {
        write!(out, "{x}")
    } else {
        out.write_all(b"\"")?;
        write_escaped(out, Escape::Json, value)?;
        out.write_all(b"\"")
    }
}

/// ` key=value`, the value quoted (Rust string syntax) when it is empty or holds
/// a space, `"` or `=`, so the pairs of a line can be told apart.
fn write_console_pair(out: &mut impl Write, key: &str, value: &Value<'_>) -> io::Result<()> {
    // Console lines are for people at a terminal, not the hot path: a String is fine.
    let text = value.to_string();
    let quote = text.is_empty() || text.contains([' ', '"', '=']);
    if quote {
        write_escaped(out, Escape::Console, format_args!(" {key}={text:?}"))
    } else {
        write_escaped(out, Escape::Console, format_args!(" {key}={text}"))
    }
}

/// Prints a configuration error as one JSON line on stderr, the way the logger
/// would (the logger is not installed yet when the configuration is read):
/// `{"level":"error","message":"invalid configuration","variable":..,"error":..}`.
pub fn print_config_error_json(variable: &str, error: &str) {
    let pairs = [("variable", variable), ("error", error)];
    let record = Record::builder()
        .level(log::Level::Error)
        .target("ws_notify::config")
        .args(format_args!("invalid configuration"))
        .key_values(&pairs)
        .build();
    let mut line = Vec::new();
    if write_record(
        &mut line,
        LogEncoding::Json,
        Timestamp::now().as_str(),
        &record,
    )
    .is_ok()
    {
        // Nowhere else to report a failed write to stderr.
        let _ = io::stderr().write_all(&line);
    }
}

/// Zap's lowercase level names.
fn json_level(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// How text is escaped on its way into a line.
#[derive(Clone, Copy)]
enum Escape {
    /// The inside of a JSON string (RFC 8259 section 7).
    Json,
    /// Plain text with control characters shown as escapes.
    Console,
}

/// Formats `value` into `out` through the escaper: no String per record.
fn write_escaped(out: &mut impl Write, escape: Escape, value: impl fmt::Display) -> io::Result<()> {
    let mut escaper = Escaper {
        out,
        escape,
        error: None,
    };
    match fmt::write(&mut escaper, format_args!("{value}")) {
        Ok(()) => Ok(()),
        Err(fmt::Error) => Err(escaper
            .error
            .unwrap_or_else(|| io::Error::other("formatting a log line failed"))),
    }
}

/// A `fmt::Write` that escapes everything written to it into an `io::Write`,
/// keeping the I/O error that `fmt` cannot carry.
struct Escaper<'a, W: Write> {
    out: &'a mut W,
    escape: Escape,
    error: Option<io::Error>,
}

impl<W: Write> fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut put = |bytes: &[u8]| {
            self.out.write_all(bytes).map_err(|error| {
                self.error = Some(error);
                fmt::Error
            })
        };
        match self.escape {
            Escape::Json => crate::message::for_each_json_escaped(text, put),
            Escape::Console => for_each_console_escaped(text, &mut put),
        }
    }
}

/// Hands `put` the pieces of `text` with every control character (C0, DEL, C1) and
/// the Unicode line and paragraph separators written as an escape (`\n`, `\r`,
/// `\t`, `\u{1b}`): a console line stays one line whatever a client sent.
fn for_each_console_escaped<E>(
    text: &str,
    put: &mut impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut plain_from = 0;
    for (i, c) in text.char_indices() {
        if !(c.is_control() || c == '\u{2028}' || c == '\u{2029}') {
            continue;
        }
        put(&text.as_bytes()[plain_from..i])?;
        let mut escaped = [0u8; 10];
        let escaped: &[u8] = match c {
            '\n' => b"\\n",
            '\r' => b"\\r",
            '\t' => b"\\t",
            _ => {
                let mut cursor = &mut escaped[..];
                // `\u{10ffff}` is the longest and fits in the array.
                let written =
                    write!(cursor, "\\u{{{:x}}}", u32::from(c)).map(|()| 10 - cursor.len());
                &escaped[..written.unwrap_or(0)]
            }
        };
        put(escaped)?;
        plain_from = i + c.len_utf8();
    }
    put(&text.as_bytes()[plain_from..])
}

/// Lets one event through per `period`; counts the ones it holds back.
///
/// For warnings that a flood could repeat thousands of times a second: the
/// caller logs only when [`RateLimited::check`] says so, and includes the
/// number of events that were skipped since the last line.
#[derive(Debug, Clone)]
pub struct RateLimited {
    period: Duration,
    last_emit: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// A limiter that lets the first event through and then at most one per `period`.
    pub fn new(period: Duration) -> Self {
        RateLimited {
            period,
            last_emit: None,
            suppressed: 0,
        }
    }

    /// Some(suppressed_since_last_emit) when the caller should log now, None when it should stay quiet.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let due = match self.last_emit {
            None => true,
            // A `now` earlier than the last emit counts as no time passed.
            Some(last) => now.saturating_duration_since(last) >= self.period,
        };
        if due {
            self.last_emit = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;

    const TIME: &str = "2026-11-28T03:30:23.123Z";

    fn line(encoding: LogEncoding, level: Level, target: &str, args: fmt::Arguments<'_>) -> String {
        let record = Record::builder()
            .level(level)
            .target(target)
            .args(args)
            .build();
        let mut out = Vec::new();
        write_record(&mut out, encoding, TIME, &record).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn json_line(level: Level, target: &str, args: fmt::Arguments<'_>) -> serde_json::Value {
        let text = line(LogEncoding::Json, level, target, args);
        assert!(text.ends_with('\n'), "{text:?}");
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn json_line_has_the_four_keys() {
        let value = json_line(
            Level::Info,
            "ws_notify::server",
            format_args!("listening on {}", "0.0.0.0:8081"),
        );
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 4, "{value}");
        assert_eq!(object["time"], TIME);
        assert_eq!(object["level"], "info");
        assert_eq!(object["target"], "ws_notify::server");
        assert_eq!(object["message"], "listening on 0.0.0.0:8081");

        let text = line(
            LogEncoding::Json,
            Level::Warn,
            "ws_notify::hub",
            format_args!("x"),
        );
        assert_eq!(
            text,
            "{\"time\":\"2026-11-28T03:30:23.123Z\",\"level\":\"warn\",\"target\":\"ws_notify::hub\",\"message\":\"x\"}\n"
        );
    }

    fn line_with_pairs(encoding: LogEncoding, pairs: &dyn log::kv::Source) -> String {
        let record = Record::builder()
            .level(Level::Info)
            .target("ws_notify::server")
            .args(format_args!("client connected"))
            .key_values(pairs)
            .build();
        let mut out = Vec::new();
        write_record(&mut out, encoding, TIME, &record).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn key_values_are_json_members() {
        let remote = std::net::SocketAddr::from(([127, 0, 0, 1], 5555));
        let text = {
            let pairs: [(&str, log::kv::Value<'_>); 6] = [
                ("user_id", log::kv::Value::from("al\"ice\n")),
                ("connection_id", log::kv::Value::from("k3f9a2-7")),
                ("remote", log::kv::Value::from_display(&remote)),
                ("duration_ms", log::kv::Value::from(1500u64)),
                ("delta", log::kv::Value::from(-3i64)),
                ("tls", log::kv::Value::from(true)),
            ];
            line_with_pairs(LogEncoding::Json, &pairs)
        };
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["message"], "client connected");
        assert_eq!(value["user_id"], "al\"ice\n");
        assert_eq!(value["connection_id"], "k3f9a2-7");
        assert_eq!(value["remote"], "127.0.0.1:5555");
        assert_eq!(value["duration_ms"], 1500);
        assert_eq!(value["delta"], -3);
        assert_eq!(value["tls"], true);
        assert_eq!(value.as_object().unwrap().len(), 10, "{value}");
    }

    #[test]
    fn key_values_on_a_console_line() {
        let pairs: [(&str, log::kv::Value<'_>); 4] = [
            ("user_id", log::kv::Value::from("evil\nINFO forged")),
            ("reason", log::kv::Value::from("client_closed")),
            ("origin", log::kv::Value::from("a b=\"c\"")),
            ("duration_ms", log::kv::Value::from(12u64)),
        ];
        let text = line_with_pairs(LogEncoding::Console, &pairs);
        assert_eq!(
            text,
            "2026-11-28T03:30:23.123Z INFO  ws_notify::server client connected \
             user_id=\"evil\\nINFO forged\" reason=client_closed origin=\"a b=\\\"c\\\"\" duration_ms=12\n"
        );
    }

    #[test]
    fn json_levels_are_lowercase() {
        for (level, name) in [
            (Level::Error, "error"),
            (Level::Warn, "warn"),
            (Level::Info, "info"),
            (Level::Debug, "debug"),
            (Level::Trace, "trace"),
        ] {
            assert_eq!(json_line(level, "t", format_args!("m"))["level"], name);
        }
    }

    #[test]
    fn json_escapes_everything_that_needs_it() {
        let nasty = "quote \" backslash \\ newline \n cr \r tab \t bs \u{8} ff \u{c} nul \0 \
                     esc \u{1b} us \u{1f} del \u{7f} unicode é ✓ 😀 \u{2028} slash /";
        let value = json_line(Level::Error, "weird\"target\n", format_args!("{nasty}"));
        assert_eq!(value["message"], nasty);
        assert_eq!(value["target"], "weird\"target\n");

        let text = line(
            LogEncoding::Json,
            Level::Info,
            "t",
            format_args!("a\u{1}b\nc\"d\\e"),
        );
        assert!(text.contains(r#""message":"a\u0001b\nc\"d\\e""#), "{text}");
        // Only the final newline is a raw control character.
        assert!(
            !text[..text.len() - 1].bytes().any(|b| b < 0x20),
            "{text:?}"
        );
    }

    #[test]
    fn json_message_built_from_many_pieces() {
        let value = json_line(
            Level::Info,
            "t",
            format_args!("{}{}{:>5}|{:?}", "a\"", 42, "b", "q\"uote"),
        );
        assert_eq!(value["message"], "a\"42    b|\"q\\\"uote\"");
    }

    #[test]
    fn console_line() {
        let text = line(
            LogEncoding::Console,
            Level::Info,
            "ws_notify::server",
            format_args!("listening on {}", 8081),
        );
        assert_eq!(
            text,
            "2026-11-28T03:30:23.123Z INFO  ws_notify::server listening on 8081\n"
        );
        let text = line(
            LogEncoding::Console,
            Level::Error,
            "ws_notify::redis_reader",
            format_args!("down"),
        );
        assert_eq!(
            text,
            "2026-11-28T03:30:23.123Z ERROR ws_notify::redis_reader down\n"
        );
    }

    #[test]
    fn console_escapes_control_characters() {
        let text = line(
            LogEncoding::Console,
            Level::Info,
            "ws_notify::server",
            format_args!(
                "client connected user_id={} origin={}",
                "evil\nINFO fake line injected\r\t\0\u{1b}[31m\u{85}\u{2028}", "é ✓ \\ \"ok\""
            ),
        );
        assert_eq!(
            text,
            "2026-11-28T03:30:23.123Z INFO  ws_notify::server client connected \
             user_id=evil\\nINFO fake line injected\\r\\t\\u{0}\\u{1b}[31m\\u{85}\\u{2028} \
             origin=é ✓ \\ \"ok\"\n"
        );
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    }

    #[test]
    fn a_full_buffer_drops_and_counts_lines() {
        let sink = LogSink::default();
        let line = [b'x'; 1000];
        let before = dropped_lines();
        for _ in 0..(LOG_BUFFER_BYTES / line.len() + 10) {
            sink.push(&line);
        }
        assert_eq!(sink.lock().pending.len(), LOG_BUFFER_BYTES / 1000 * 1000);
        // Other tests may log at the same time: at least our ten were counted.
        assert!(dropped_lines() - before >= 10);
    }

    #[test]
    fn the_writer_drains_and_flush_waits_for_it() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink: &'static LogSink = Box::leak(Box::default());
        let written = Shared::default();
        let mut out = written.clone();
        std::thread::spawn(move || sink.write_until_closed(&mut out));
        for i in 0..100 {
            sink.push(format!("line {i}\n").as_bytes());
        }
        sink.flush(Duration::from_secs(30));
        let text = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 100);
        assert!(text.ends_with("line 99\n"), "{text}");
    }

    #[test]
    fn write_errors_are_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let record = Record::builder()
            .level(Level::Info)
            .target("t")
            .args(format_args!("message"))
            .build();
        for encoding in [LogEncoding::Json, LogEncoding::Console] {
            let error = write_record(&mut Broken, encoding, TIME, &record).unwrap_err();
            assert_eq!(error.to_string(), "disk full");
        }
    }

    #[test]
    fn init_twice_does_not_panic() {
        init(LevelFilter::Info, LogEncoding::Json);
        init(LevelFilter::Debug, LogEncoding::Console);
    }

    #[test]
    fn rate_limited_lets_one_through_per_period() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut limiter = RateLimited::new(Duration::from_secs(1));

        assert_eq!(limiter.check(at(0)), Some(0), "the first event is logged");
        assert_eq!(limiter.check(at(1)), None);
        assert_eq!(limiter.check(at(500)), None);
        assert_eq!(limiter.check(at(999)), None);
        assert_eq!(limiter.check(at(1000)), Some(3), "period over: 3 held back");
        assert_eq!(limiter.check(at(1001)), None);
        assert_eq!(limiter.check(at(5000)), Some(1));
        assert_eq!(limiter.check(at(9000)), Some(0), "quiet periods report 0");
        // The period counts from the last emit, not from a fixed grid.
        assert_eq!(limiter.check(at(9999)), None);
        assert_eq!(limiter.check(at(10_000)), Some(1));
    }

    #[test]
    fn rate_limited_clock_going_backwards() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut limiter = RateLimited::new(Duration::from_secs(1));
        assert_eq!(limiter.check(start), Some(0));
        assert_eq!(limiter.check(start - Duration::from_secs(5)), None);
        assert_eq!(limiter.check(start + Duration::from_secs(1)), Some(1));
    }

    #[test]
    fn rate_limited_zero_period_lets_everything_through() {
        let now = Instant::now();
        let mut limiter = RateLimited::new(Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(limiter.check(now), Some(0));
        }
    }
}
