//! Logging: the `log` facade backed by `env_logger`, writing one line per
//! record to stderr, either as a JSON object (`LOGGER_ENCODING=json`, the
//! default, shaped like the Go service's Zap lines) or as plain text for a
//! terminal. `LOGGER_LEVEL` sets the level; `RUST_LOG`, when set, refines it
//! per module on top. Also [`RateLimited`], for warnings that could otherwise
//! repeat once per message (bad payloads, full buffers).
//!
//! Any thread may log; `init` runs once on the main thread at start-up.

use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use log::{LevelFilter, Record};

use crate::clock::Timestamp;
use crate::config::LogEncoding;

/// Installs the global logger: `level` for everything, refined by `RUST_LOG`
/// when that is set, each record written to stderr in `encoding`.
pub fn init(level: LevelFilter, encoding: LogEncoding) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .target(env_logger::Target::Stderr)
        .write_style(env_logger::WriteStyle::Never)
        .format(move |out, record| write_record(out, encoding, Timestamp::now().as_str(), record));
    if let Ok(filters) = std::env::var("RUST_LOG")
        && !filters.is_empty()
    {
        builder.parse_filters(&filters);
    }
    // Fails only when a logger is already installed (a second call, or a test
    // harness that set one up); keeping the first logger is what we want.
    let _ = builder.try_init();
}

/// Writes one log line (with its trailing newline) for `record` to `out`.
/// The logger and the tests both go through here.
///
/// JSON: `{"time":"…","level":"info","target":"ws_notify::server","message":"…"}`.
/// Console: `2026-11-28T03:30:23.123Z INFO  ws_notify::server message`.
pub(crate) fn write_record(
    out: &mut impl Write,
    encoding: LogEncoding,
    time: &str,
    record: &Record<'_>,
) -> io::Result<()> {
    match encoding {
        LogEncoding::Json => {
            out.write_all(b"{\"time\":\"")?;
            write_json_escaped(out, time)?;
            out.write_all(b"\",\"level\":\"")?;
            out.write_all(json_level(record.level()).as_bytes())?;
            out.write_all(b"\",\"target\":\"")?;
            write_json_escaped(out, record.target())?;
            out.write_all(b"\",\"message\":\"")?;
            // The message is formatted straight into the escaper: no String per record.
            let mut escaper = JsonEscaper { out, error: None };
            if fmt::write(&mut escaper, *record.args()).is_err() {
                return Err(escaper
                    .error
                    .unwrap_or_else(|| io::Error::other("formatting a log message failed")));
            }
            out.write_all(b"\"}\n")
        }
        LogEncoding::Console => writeln!(
            out,
            "{} {:<5} {} {}",
            time,
            record.level().as_str(),
            record.target(),
            record.args()
        ),
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

fn write_json_escaped(out: &mut impl Write, text: &str) -> io::Result<()> {
    let mut escaper = JsonEscaper { out, error: None };
    match fmt::Write::write_str(&mut escaper, text) {
        Ok(()) => Ok(()),
        Err(fmt::Error) => Err(escaper
            .error
            .unwrap_or_else(|| io::Error::other("escaping a log field failed"))),
    }
}

/// A `fmt::Write` that JSON-escapes (RFC 8259 section 7) everything written
/// to it into an `io::Write`, keeping the I/O error that `fmt` cannot carry.
struct JsonEscaper<'a, W: Write> {
    out: &'a mut W,
    error: Option<io::Error>,
}

impl<W: Write> JsonEscaper<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> fmt::Result {
        self.out.write_all(bytes).map_err(|error| {
            self.error = Some(error);
            fmt::Error
        })
    }
}

impl<W: Write> fmt::Write for JsonEscaper<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        crate::message::for_each_json_escaped(text, |piece| self.put(piece))
    }
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
