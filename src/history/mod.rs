//! Message history and resume (README: "History and resume"): the stream id
//! type, the id splice shared with the Redis function, the function library,
//! and the history reader thread ([`reader`]) that reads users' streams off the
//! event loop.
//!
//! With `WS_HISTORY_SIZE` > 0, publishers call the Redis function
//! `ws_notify_publish` (the library is `src/history/ws_notify.lua`): it appends the
//! message to a stream whose key is the user's channel name, and publishes it
//! with `"id":"<stream id>"` spliced in as its first member. A client that
//! reconnects with `?since=<id>` gets what it missed from that stream.

pub mod reader;

use std::fmt;
use std::time::Duration;

/// The Redis Functions library as shipped, with the default size and TTL.
pub const LIBRARY_TEMPLATE: &str = include_str!("ws_notify.lua");
/// The lines of the template that `library_code` replaces.
const SIZE_LINE: &str = "local HISTORY_SIZE = 100\n";
const TTL_LINE: &str = "local HISTORY_TTL_SECONDS = 86400\n";

/// The library's source with this gateway's history size and TTL, as loaded
/// with `FUNCTION LOAD REPLACE` (the values live in the loaded code, so that
/// publishers pass only the channel and the message).
pub fn library_code(size: usize, ttl: Duration) -> String {
    // EXPIRE takes whole seconds; a TTL under a second would expire at once.
    let ttl_seconds = ttl.as_secs().max(1);
    LIBRARY_TEMPLATE
        .replacen(SIZE_LINE, &format!("local HISTORY_SIZE = {size}\n"), 1)
        .replacen(
            TTL_LINE,
            &format!("local HISTORY_TTL_SECONDS = {ttl_seconds}\n"),
            1,
        )
}

/// `FUNCTION LOAD REPLACE <library>` on one Redis (a cluster needs it on
/// every master).
pub fn load_library(con: &mut redis::Connection, library: &str) -> Result<(), String> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library)
        .query::<String>(con)
        .map(drop)
        .map_err(|e| format!("FUNCTION LOAD (Redis 7.0+ is needed): {e}"))
}

/// A Redis stream entry id, `<milliseconds>-<sequence>`. Ordered as Redis orders
/// them (milliseconds first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// `0-0`: before every entry (Redis never assigns it).
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// Parses `ms-seq` or `ms` (read as `ms-0`), both decimal without sign,
    /// each fitting in 64 bits. Anything else is None.
    pub fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = match text.split_once('-') {
            Some((ms, seq)) => (ms, Some(seq)),
            None => (text, None),
        };
        let ms = parse_decimal(ms)?;
        let seq = match seq {
            Some(seq) => parse_decimal(seq)?,
            None => 0,
        };
        Some(StreamId { ms, seq })
    }

    /// Parses the bytes of an id as Redis sends them.
    pub fn parse_bytes(bytes: &[u8]) -> Option<StreamId> {
        std::str::from_utf8(bytes).ok().and_then(StreamId::parse)
    }
}

/// Digits only (no sign, no spaces), at least one, within u64.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The message `ws_notify_publish` publishes: `message` (a JSON object) with
/// `"id":"<id>"` spliced in as its first member, every other byte unchanged.
/// None when `message` does not start with `{` after JSON whitespace. Must match
/// the Lua function byte for byte: replayed messages are rebuilt with it from
/// the stored original.
pub fn splice_id(id: &str, message: &[u8]) -> Option<Vec<u8>> {
    let start = message
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))?;
    if message[start] != b'{' {
        return None;
    }
    let rest = &message[start + 1..];
    let empty_object = rest
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        == Some(&b'}');
    let mut out = Vec::with_capacity(message.len() + id.len() + 10);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.push(b'"');
    if !empty_object {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_as_redis_writes_them() {
        assert_eq!(
            StreamId::parse("1764680000000-3"),
            Some(StreamId {
                ms: 1_764_680_000_000,
                seq: 3
            })
        );
        assert_eq!(
            StreamId::parse("1764680000000"),
            Some(StreamId {
                ms: 1_764_680_000_000,
                seq: 0
            })
        );
        assert_eq!(StreamId::parse("0-0"), Some(StreamId::ZERO));
        assert_eq!(
            StreamId::parse("18446744073709551615-18446744073709551615"),
            Some(StreamId {
                ms: u64::MAX,
                seq: u64::MAX
            })
        );
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "+1",
            "1-+2",
            " 1",
            "1 ",
            "abc",
            "1-x",
            "1.5",
            "18446744073709551616",
            "1-18446744073709551616",
            "$",
            "*",
            "%31",
        ] {
            assert_eq!(StreamId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            StreamId::parse("5-1").map(|id| id.to_string()),
            Some("5-1".into())
        );
        assert!(StreamId::parse("5-10") > StreamId::parse("5-9"));
        assert!(StreamId::parse("6-0") > StreamId::parse("5-99"));
    }

    #[test]
    fn the_id_is_spliced_in_first_and_the_rest_is_unchanged() {
        let splice = |message: &str| {
            splice_id("7-1", message.as_bytes()).map(|m| String::from_utf8(m).unwrap())
        };
        assert_eq!(
            splice(r#"{"type":"t","payload":{"b":1, "a":[1.50]}}"#).as_deref(),
            Some(r#"{"id":"7-1","type":"t","payload":{"b":1, "a":[1.50]}}"#)
        );
        assert_eq!(
            splice(" \n{ \"type\" : \"t\" }").as_deref(),
            Some("{\"id\":\"7-1\", \"type\" : \"t\" }")
        );
        assert_eq!(splice("{ }").as_deref(), Some(r#"{"id":"7-1" }"#));
        for bad in ["", "  ", "[1]", "\"s\"", "null", "x{", "\u{a0}{}"] {
            assert_eq!(splice(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_library_carries_the_configured_size_and_ttl() {
        let code = library_code(25, Duration::from_secs(3600));
        assert!(code.starts_with("#!lua name=ws_notify\n"));
        assert!(code.contains("local HISTORY_SIZE = 25\n"), "{code}");
        assert!(
            code.contains("local HISTORY_TTL_SECONDS = 3600\n"),
            "{code}"
        );
        let code = library_code(1, Duration::from_millis(10));
        assert!(code.contains("local HISTORY_TTL_SECONDS = 1\n"), "{code}");
        // The template still has the lines that are replaced.
        assert!(LIBRARY_TEMPLATE.contains(SIZE_LINE) && LIBRARY_TEMPLATE.contains(TTL_LINE));
    }
}
