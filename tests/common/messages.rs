//! Checks of the messages the gateway sends (`type`, `payload`, `timestamp`).

use serde_json::Value;

use super::now_millis;

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` into milliseconds since the epoch.
pub fn parse_rfc3339_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, milli) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + milli)
}

/// Asserts an RFC 3339 UTC timestamp with milliseconds within 10 s of now.
#[track_caller]
pub fn assert_timestamp(value: &Value) {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let t = parse_rfc3339_millis(s)
        .unwrap_or_else(|| panic!("timestamp {s:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"));
    let skew = (t - now_millis()).abs();
    assert!(skew < 10_000, "timestamp {s:?} is {skew} ms away from now");
}

/// Asserts a server message has exactly `type`, `payload`, `timestamp`, with
/// the given type and a valid timestamp.
#[track_caller]
pub fn assert_message(msg: &Value, ty: &str) {
    let obj = msg
        .as_object()
        .unwrap_or_else(|| panic!("message is not an object: {msg}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["payload", "timestamp", "type"],
        "message keys of {msg}"
    );
    assert_eq!(msg["type"], ty, "message type of {msg}");
    assert_timestamp(&msg["timestamp"]);
}
