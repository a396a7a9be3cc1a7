//! JSON Web Tokens for the tests, and the one base64url codec of the test
//! suite (the `base64` crate, as jsonwebtoken uses).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::now_secs;

/// `{"sub": sub, "exp": now + exp_offset_secs}`, to be extended by tests.
pub fn claims(sub: &str, exp_offset_secs: i64) -> Value {
    json!({ "sub": sub, "exp": now_secs() + exp_offset_secs })
}

/// HS256 token for `sub` expiring `exp_offset_secs` from now.
pub fn token(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    token_with_claims(secret, &claims(sub, exp_offset_secs))
}

/// HS256 token with arbitrary claims.
pub fn token_with_claims(secret: &str, claims: &Value) -> String {
    token_alg(secret, Algorithm::HS256, claims)
}

pub fn token_alg(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode JWT")
}

/// An `alg: none` token (no signature), which must always be refused.
pub fn unsigned_token(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

/// Base64url without padding (RFC 7515 section 2), as in a JWT.
pub fn base64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The bytes of unpadded base64url text (a JWT part); fails the test on
/// anything else.
#[track_caller]
pub fn base64url_decode(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64url ({e}): {text:?}"))
}

/// The claims of a JWT, decoded without checking the signature.
#[track_caller]
pub fn token_claims(token: &str) -> Value {
    let part = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {token:?}"));
    serde_json::from_slice(&base64url_decode(part))
        .unwrap_or_else(|e| panic!("JWT claims are not JSON ({e}): {token:?}"))
}

/// Every byte as `%XX`.
pub fn percent_encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}
