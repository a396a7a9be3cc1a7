//! Plain HTTP answers (errors, /health, /metrics) and small HTTP text helpers.

use std::borrow::Cow;

/// Decodes `%XX` escapes (and `+` as space when `plus_as_space`), as in
/// `application/x-www-form-urlencoded` query strings and URL user info.
/// Malformed escapes are kept literally, like browsers and Go's lenient parsers do.
pub fn percent_decode(input: &[u8], plus_as_space: bool) -> Cow<'_, [u8]> {
    if !input.iter().any(|&b| b == b'%' || (plus_as_space && b == b'+')) {
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
