//! Wall-clock timestamps in the wire format: RFC 3339, UTC, milliseconds
//! (`2026-11-28T03:30:23.123Z`). Formatting is done by hand into a fixed array
//! so the hot path neither allocates nor depends on a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a formatted timestamp: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub const TIMESTAMP_LEN: usize = 24;

/// A formatted RFC 3339 timestamp with millisecond precision.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    bytes: [u8; TIMESTAMP_LEN],
    unix_millis: u64,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        Timestamp::from_unix_millis(unix_millis(SystemTime::now()))
    }

    /// Formats milliseconds since the Unix epoch.
    pub fn from_unix_millis(unix_millis: u64) -> Timestamp {
        let secs = unix_millis / 1000;
        let millis = (unix_millis % 1000) as u32;
        let days = (secs / 86_400) as i64;
        let rem = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let mut bytes = *b"0000-00-00T00:00:00.000Z";
        put_digits(&mut bytes[0..4], year.clamp(0, 9999) as u32);
        put_digits(&mut bytes[5..7], month);
        put_digits(&mut bytes[8..10], day);
        put_digits(&mut bytes[11..13], rem / 3600);
        put_digits(&mut bytes[14..16], rem / 60 % 60);
        put_digits(&mut bytes[17..19], rem % 60);
        put_digits(&mut bytes[20..23], millis);
        Timestamp { bytes, unix_millis }
    }

    /// The formatted text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written into `bytes`.
        std::str::from_utf8(&self.bytes).unwrap_or("1970-01-01T00:00:00.000Z")
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> u64 {
        self.unix_millis
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs_now() -> u64 {
    unix_millis(SystemTime::now()) / 1000
}

fn put_digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch() {
        assert_eq!(
            Timestamp::from_unix_millis(0).as_str(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn formats_known_instants() {
        // 2026-11-28T03:30:23.123Z
        assert_eq!(
            Timestamp::from_unix_millis(1_795_836_623_123).as_str(),
            "2026-11-28T03:30:23.123Z"
        );
        // Leap day 2024-02-29T23:59:59.999Z
        assert_eq!(
            Timestamp::from_unix_millis(1_709_251_199_999).as_str(),
            "2024-02-29T23:59:59.999Z"
        );
        // 2000-03-01T00:00:00.000Z (century leap year)
        assert_eq!(
            Timestamp::from_unix_millis(951_868_800_000).as_str(),
            "2000-03-01T00:00:00.000Z"
        );
    }
}
