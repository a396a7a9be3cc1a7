//! Token extraction and JWT validation (see the README, "Connecting").
//!
//! Owns the decoding key and the validation rules, built once at start-up by
//! [`Authenticator::new`] from [`JwtConfig`]; afterwards the event loop thread
//! calls [`token_candidates`] and [`Authenticator::authenticate`] for every
//! upgrade request. Nothing here blocks, allocates per byte of input beyond the
//! token itself, or logs per request: the caller logs the [`AuthError`] reason
//! (never the token) and always answers the client with `invalid or expired token`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{ConfigError, JwtConfig};
use crate::http::percent_decode;

/// Longest token accepted; anything longer is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Most cookies named `JWT_COOKIE_NAME` tried in one request. Browsers send one
/// per matching path and domain, so two cover a stale cookie beside a fresh one.
pub const MAX_COOKIE_CANDIDATES: usize = 2;

/// Most tokens tried in one request: the bearer token, [`MAX_COOKIE_CANDIDATES`]
/// cookies and the query parameter. A request with hundreds of cookies still
/// costs at most this many signature checks.
pub const MAX_TOKEN_CANDIDATES: usize = 2 + MAX_COOKIE_CANDIDATES;

/// Largest `JWT_LEEWAY` accepted. Clock skew is seconds, not days; a bound also
/// keeps jsonwebtoken's `now - leeway` from underflowing.
const MAX_LEEWAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The algorithms an HMAC secret accepts, whatever `JWT_ALGORITHM` says: the Go
/// service accepted any of them with the same secret.
const HMAC_ALGORITHMS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// Shortest HMAC secret that passes without a warning: RFC 7518 section 3.2
/// asks for a key at least as long as the hash output (32 bytes for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

/// The `JWT_SECRET_KEY` of `template.env`: public, so warned about at start.
pub const PLACEHOLDER_SECRET: &str = "dev-secret-change-me";

/// Where a token can come from in an upgrade request (borrowed from the parsed head).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenSources<'a> {
    /// Value of the `Authorization` header.
    pub authorization: Option<&'a [u8]>,
    /// Values of every `Cookie` header.
    pub cookies: &'a [&'a [u8]],
    /// The raw query string after `?`, without the `?`.
    pub query: Option<&'a [u8]>,
}

/// Which source a token candidate was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <jwt>`.
    Bearer,
    /// A cookie named `JWT_COOKIE_NAME`.
    Cookie,
    /// The `token` query parameter.
    Query,
}

impl TokenSource {
    /// A stable name for log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Bearer => "authorization",
            TokenSource::Cookie => "cookie",
            TokenSource::Query => "query",
        }
    }
}

/// One token found in a request, not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCandidate<'a> {
    pub source: TokenSource,
    pub token: Cow<'a, str>,
}

/// Every token in the request, in the documented order, at most
/// [`MAX_TOKEN_CANDIDATES`]: `Authorization: Bearer <jwt>` (scheme
/// case-insensitive), then the cookies named `cookie_name` (if `Some`) in the
/// order sent (at most [`MAX_COOKIE_CANDIDATES`]), then the first `token` query
/// parameter (percent-decoded, `+` as space). Empty values count as absent.
/// Non-UTF-8 bytes are converted lossily, so such a token then fails validation
/// rather than counting as missing. Lazy: a later source is only decoded when the
/// caller asks for it.
pub fn token_candidates<'a>(
    sources: &TokenSources<'a>,
    cookie_name: Option<&'a str>,
) -> impl Iterator<Item = TokenCandidate<'a>> + 'a {
    let bearer = sources
        .authorization
        .and_then(bearer_token)
        .map(|token| TokenCandidate {
            source: TokenSource::Bearer,
            token: String::from_utf8_lossy(token),
        });
    let cookie_headers = sources.cookies;
    let cookies = cookie_name
        .into_iter()
        .flat_map(move |name| cookie_values(cookie_headers, name))
        .filter(|value| !value.is_empty())
        .take(MAX_COOKIE_CANDIDATES)
        .map(|value| TokenCandidate {
            source: TokenSource::Cookie,
            token: String::from_utf8_lossy(value),
        });
    let query = sources
        .query
        .into_iter()
        .filter_map(query_token)
        .map(|value| TokenCandidate {
            source: TokenSource::Query,
            token: bytes_to_str(percent_decode(value, true)),
        });
    bearer.into_iter().chain(cookies).chain(query)
}

/// `Bearer <token>` with the scheme matched case-insensitively (RFC 7235 §2.1:
/// "the auth-scheme is case-insensitive"). Any other scheme counts as no token.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let value = trim(value);
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    if !matches!(rest[0], b' ' | b'\t') {
        return None; // "Bearerx..." is another scheme
    }
    let token = trim(rest);
    (!token.is_empty()).then_some(token)
}

/// The values of the cookies named exactly `name` across all `Cookie` headers
/// (`a=1; b="2"`), in order, each with one pair of surrounding quotes removed.
fn cookie_values<'a>(
    headers: &'a [&'a [u8]],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .flat_map(|header| header.split(|&b| b == b';'))
        .filter_map(move |pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            if trim(&pair[..eq]) != name.as_bytes() {
                return None;
            }
            let value = trim(&pair[eq + 1..]);
            Some(match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            })
        })
}

/// The raw (still percent-encoded) value of the first `token` parameter, or
/// `None` when it is missing or empty.
fn query_token(query: &[u8]) -> Option<&[u8]> {
    for param in query.split(|&b| b == b'&') {
        let (key, value) = match param.iter().position(|&b| b == b'=') {
            Some(eq) => (&param[..eq], &param[eq + 1..]),
            None => (param, &b""[..]),
        };
        if key == b"token" {
            return (!value.is_empty()).then_some(value);
        }
    }
    None
}

fn bytes_to_str(bytes: Cow<'_, [u8]>) -> Cow<'_, str> {
    match bytes {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(v) => match String::from_utf8(v) {
            Ok(s) => Cow::Owned(s),
            Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        },
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t');
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Who an accepted token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The non-empty string claim named by `JWT_USER_CLAIM`.
    pub user_id: String,
    /// The `exp` claim, unix seconds (floored when the token carries a fraction).
    pub expires_at: u64,
}

/// Why a token was refused; for debug logs and metrics only (the client always
/// sees "invalid or expired token"). Never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Not three base64url parts of JSON, or a header we cannot honour (`crit`).
    Malformed,
    /// The signature does not verify with the configured key.
    BadSignature,
    /// `exp` (plus leeway) has passed.
    Expired,
    /// `nbf` (minus leeway) is in the future.
    NotYetValid,
    /// `alg` is not one this key accepts (`none`, HMAC with a public key, ...).
    WrongAlgorithm,
    /// `JWT_ISSUER` is set and `iss` is missing or different.
    WrongIssuer,
    /// `JWT_AUDIENCE` is set and `aud` is missing or does not contain it.
    WrongAudience,
    /// No numeric `exp` claim.
    MissingExp,
    /// The `JWT_USER_CLAIM` claim is missing, empty or not a string.
    BadUserClaim,
    /// Longer than [`MAX_TOKEN_LEN`].
    Oversized,
}

impl AuthError {
    /// A stable snake_case name, usable as a log field or metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingExp => "missing_exp",
            AuthError::BadUserClaim => "bad_user_claim",
            AuthError::Oversized => "oversized",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for AuthError {}

/// The key and validation rules, built once at start-up.
#[derive(Debug)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    user_claim: String,
    /// Seconds; applied again to the floored `exp` (jsonwebtoken rounds it).
    leeway: u64,
}

impl Authenticator {
    /// Builds the key and validation rules once at start-up.
    ///
    /// With `JWT_SECRET_KEY`: HMAC, accepting HS256, HS384 and HS512 (as the Go
    /// service did); `JWT_ALGORITHM`, if set, must name one of them. A secret
    /// shorter than [`MIN_SECRET_BYTES`] or equal to `template.env`'s placeholder
    /// is logged as a warning (without the secret). With `JWT_PUBLIC_KEY_FILE`
    /// (which wins if both are set): the PEM public key, and exactly one
    /// algorithm, from `JWT_ALGORITHM` or inferred from the key (RSA → RS256, EC
    /// P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA); an RSA key also takes
    /// RS384/RS512/PS256/PS384/PS512. HMAC tokens are then refused, so the public
    /// key text can never serve as an HMAC secret (algorithm confusion). Errors
    /// name the variables at fault.
    pub fn new(cfg: &JwtConfig) -> Result<Authenticator, ConfigError> {
        let configured_alg = cfg.algorithm;
        if cfg.leeway > MAX_LEEWAY {
            return Err(config_error("JWT_LEEWAY", "must be at most 24h".to_owned()));
        }
        if cfg.user_claim.is_empty() {
            return Err(config_error(
                "JWT_USER_CLAIM",
                "must not be empty".to_owned(),
            ));
        }

        let (key, algorithms) = if let Some(path) = &cfg.public_key_file {
            let pem = std::fs::read(path).map_err(|e| {
                config_error(
                    "JWT_PUBLIC_KEY_FILE",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let (key, kind) = load_public_key(&pem).map_err(|message| {
                config_error(
                    "JWT_PUBLIC_KEY_FILE",
                    format!("{}: {message}", path.display()),
                )
            })?;
            let alg = match configured_alg {
                None => kind.default_algorithm(),
                Some(alg) if kind.accepts(alg) => alg,
                Some(alg) => {
                    return Err(config_error(
                        "JWT_ALGORITHM",
                        format!(
                            "{alg:?} does not match the {} key in JWT_PUBLIC_KEY_FILE (use {:?} or another algorithm for that key, or unset JWT_ALGORITHM)",
                            kind.describe(),
                            kind.default_algorithm()
                        ),
                    ));
                }
            };
            (key, vec![alg])
        } else {
            let secret = match cfg.secret.as_deref() {
                Some(s) if !s.is_empty() => s,
                _ => {
                    return Err(config_error(
                        "JWT_SECRET_KEY",
                        "required unless JWT_PUBLIC_KEY_FILE is set".to_owned(),
                    ));
                }
            };
            if let Some(warning) = weak_secret_warning(secret) {
                log::warn!("{warning}");
            }
            if let Some(alg) = configured_alg
                && alg.family() != AlgorithmFamily::Hmac
            {
                return Err(config_error(
                    "JWT_ALGORITHM",
                    format!(
                        "{alg:?} needs JWT_PUBLIC_KEY_FILE; with JWT_SECRET_KEY use HS256, HS384 or HS512"
                    ),
                ));
            }
            (
                DecodingKey::from_secret(secret.as_bytes()),
                HMAC_ALGORITHMS.to_vec(),
            )
        };

        let leeway = cfg.leeway.as_secs();
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        // Only checked when configured (README, "Connecting"); when configured, the claim
        // must be present, as with golang-jwt's WithIssuer/WithAudience.
        let issuer = cfg.issuer.as_deref().filter(|s| !s.is_empty());
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        let audience = cfg.audience.as_deref().filter(|s| !s.is_empty());
        if let Some(aud) = audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        } else {
            // jsonwebtoken would otherwise refuse every token that carries `aud`.
            validation.validate_aud = false;
        }
        validation.set_required_spec_claims(&required);

        Ok(Authenticator {
            key,
            validation,
            user_claim: cfg.user_claim.clone(),
            leeway,
        })
    }

    /// Validates signature, `exp` (required), `nbf` (when present), issuer and
    /// audience (when configured), with the configured leeway, and that the claim
    /// named by `JWT_USER_CLAIM` is a non-empty string; returns that string and
    /// `exp`. Tokens longer than 8 KiB are refused with `Oversized` before any
    /// decoding; `alg: none` is refused.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Oversized);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| self.map_error(e.kind(), token))?;
        // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we
        // understand none.
        if data.header.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let mut claims = data.claims;
        let expires_at = match claims.get("exp") {
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(secs), _) => secs,
                (None, Some(f)) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => f as u64,
                _ => return Err(AuthError::MissingExp),
            },
            _ => return Err(AuthError::MissingExp),
        };
        // jsonwebtoken compares a rounded fractional `exp`; we report the floor,
        // so hold the token to that.
        if expires_at.saturating_add(self.leeway) < jsonwebtoken::get_current_timestamp() {
            return Err(AuthError::Expired);
        }
        match claims.remove(&self.user_claim) {
            Some(Value::String(user_id)) if !user_id.is_empty() => Ok(Identity {
                user_id,
                expires_at,
            }),
            _ => Err(AuthError::BadUserClaim),
        }
    }
}

fn config_error(variable: &'static str, message: String) -> ConfigError {
    ConfigError { variable, message }
}

/// Why `secret` must not be trusted, as a log line that does not repeat it, or
/// `None` when it is long enough and not the template's placeholder.
pub fn weak_secret_warning(secret: &str) -> Option<&'static str> {
    if secret == PLACEHOLDER_SECRET {
        Some(
            "JWT_SECRET_KEY is the public placeholder from template.env: anyone can sign \
             tokens for any user. Set a random secret of at least 32 bytes \
             (e.g. `openssl rand -base64 48`).",
        )
    } else if secret.len() < MIN_SECRET_BYTES {
        Some(
            "JWT_SECRET_KEY is shorter than 32 bytes: a short HMAC secret can be guessed \
             offline from a single token, and then anyone can sign tokens for any user. \
             Set a random secret of at least 32 bytes (e.g. `openssl rand -base64 48`).",
        )
    } else {
        None
    }
}

/// The kind of public key found in `JWT_PUBLIC_KEY_FILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    fn default_algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::EcP256 => Algorithm::ES256,
            KeyKind::EcP384 => Algorithm::ES384,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }

    fn accepts(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => alg.family() == AlgorithmFamily::Rsa,
            KeyKind::EcP256 | KeyKind::EcP384 | KeyKind::Ed25519 => alg == self.default_algorithm(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Ed25519 => "Ed25519",
        }
    }
}

/// Parses a PEM public key (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`) and
/// checks now that it is usable, so a bad file stops the server at start instead
/// of failing every handshake.
fn load_public_key(pem: &[u8]) -> Result<(DecodingKey, KeyKind), String> {
    let label = pem_label(pem).ok_or("no PEM block found")?;
    if label.contains("PRIVATE KEY") {
        return Err("contains a private key; give the public key".to_owned());
    }
    if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
        return Err(format!("expected a PUBLIC KEY PEM block, found {label:?}"));
    }
    let invalid = |what: &str| format!("not a valid {what} public key");

    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        let der = key.try_get_as_bytes().map_err(|_| invalid("RSA"))?;
        let (n, e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_public_key)(der)
        .map_err(|_| invalid("RSA"))?;
        return Ok((DecodingKey::from_rsa_raw_components(&n, &e), KeyKind::Rsa));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        // An uncompressed SEC1 point: 0x04 || x || y.
        let kind = match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => KeyKind::EcP256,
            Ok(97) => KeyKind::EcP384,
            _ => {
                return Err(
                    "unsupported EC key (expected an uncompressed P-256 or P-384 key)".to_owned(),
                );
            }
        };
        check_with_dummy_signature(&key, kind.default_algorithm()).map_err(|_| invalid("EC"))?;
        return Ok((key, kind));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        // jsonwebtoken slices the first 32 bytes without checking the length.
        if key.try_get_as_bytes().map(<[u8]>::len) != Ok(32) {
            return Err(invalid("Ed25519"));
        }
        check_with_dummy_signature(&key, Algorithm::EdDSA).map_err(|_| invalid("Ed25519"))?;
        return Ok((key, KeyKind::Ed25519));
    }
    Err("not an RSA, EC (P-256/P-384) or Ed25519 public key".to_owned())
}

/// jsonwebtoken parses EC and Ed keys when it builds a verifier: an `Err` here
/// means the key is unusable (a wrong signature is `Ok(false)`).
fn check_with_dummy_signature(key: &DecodingKey, alg: Algorithm) -> Result<bool, ()> {
    jsonwebtoken::crypto::verify("AAAA", b"probe", key, alg).map_err(|_| ())
}

/// The label of the first `-----BEGIN <label>-----` line.
fn pem_label(pem: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(pem);
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    let end = rest.find("-----")?;
    Some(rest[..end].trim().to_owned())
}

impl Authenticator {
    /// Maps jsonwebtoken's error to our reason. `token` is only re-read, on this
    /// error path, to tell apart the causes jsonwebtoken reports as a JSON error.
    fn map_error(&self, kind: &ErrorKind, token: &str) -> AuthError {
        match kind {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::Signing(_)
            | ErrorKind::Provider(_) => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::MissingAlgorithm => AuthError::WrongAlgorithm,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
                match claim.as_str() {
                    "exp" => AuthError::MissingExp,
                    "iss" => AuthError::WrongIssuer,
                    "aud" => AuthError::WrongAudience,
                    _ => AuthError::Malformed,
                }
            }
            ErrorKind::Json(_) => self.classify_json_error(token),
            _ => AuthError::Malformed,
        }
    }

    /// jsonwebtoken reports as a JSON error both a header it cannot parse (an
    /// unknown `alg` such as `none`) and, after the signature has verified,
    /// claims whose `exp`/`nbf`/`sub`/`iss`/`aud` is an array or object where it
    /// expects a scalar (its claim parser then abandons the whole document).
    fn classify_json_error(&self, token: &str) -> AuthError {
        if jsonwebtoken::decode_header(token).is_err() {
            return if header_has_unknown_alg(token) {
                AuthError::WrongAlgorithm
            } else {
                AuthError::Malformed
            };
        }
        let claims = token
            .split('.')
            .nth(1)
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
            .and_then(|json| serde_json::from_slice::<Map<String, Value>>(&json).ok());
        let Some(claims) = claims else {
            return AuthError::Malformed;
        };
        if !claims.get("exp").is_some_and(Value::is_number) {
            AuthError::MissingExp
        } else if !matches!(claims.get(&self.user_claim), Some(Value::String(s)) if !s.is_empty()) {
            AuthError::BadUserClaim
        } else {
            AuthError::Malformed
        }
    }
}

/// Whether the token's header parses as JSON with a string `alg` that
/// jsonwebtoken does not know (`none`, `HS1`, ...). Only called on the error path.
fn header_has_unknown_alg(token: &str) -> bool {
    let Some(header) = token
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
    else {
        return false;
    };
    match serde_json::from_slice::<Map<String, Value>>(&header) {
        Ok(map) => match map.get("alg") {
            Some(Value::String(alg)) => Algorithm::from_str(alg).is_err(),
            _ => false,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;
    use std::path::{Path, PathBuf};

    const SECRET: &str = "test-secret-0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn jwt_config() -> JwtConfig {
        JwtConfig {
            secret: Some(SECRET.to_owned()),
            public_key_file: None,
            algorithm: None,
            user_claim: "sub".to_owned(),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            cookie_name: None,
        }
    }

    /// `Authenticator::new` that panics with the variable and message on error.
    fn build(cfg: &JwtConfig) -> Authenticator {
        match Authenticator::new(cfg) {
            Ok(auth) => auth,
            Err(e) => panic!("config refused: {}: {}", e.variable, e.message),
        }
    }

    fn hmac_auth() -> Authenticator {
        build(&jwt_config())
    }

    /// HS256-signs `header.claims` as given, so malformed parts get past the signature.
    fn signed_raw(header: &[u8], claims_b64: &str) -> String {
        let message = format!("{}.{claims_b64}", URL_SAFE_NO_PAD.encode(header));
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("sign");
        format!("{message}.{signature}")
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        encode(&Header::new(alg), claims, key).expect("encode")
    }

    fn hs256(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    fn config_err(cfg: &JwtConfig) -> ConfigError {
        match Authenticator::new(cfg) {
            Ok(_) => panic!("config unexpectedly accepted"),
            Err(e) => e,
        }
    }

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path =
                std::env::temp_dir().join(format!("ws-notify-auth-{}-{name}", std::process::id()));
            // Leftover from an earlier aborted run with the same pid: safe to remove.
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).expect("write temp file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Best effort: a leftover temp dir is harmless.
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A committed test-only key pair (tests/fixtures/README.md).
    struct KeyPair {
        private_pem: &'static [u8],
        public_pem: &'static [u8],
        /// The public key's path, for `JWT_PUBLIC_KEY_FILE`.
        public_path: &'static str,
    }

    macro_rules! fixture_pair {
        ($name:literal) => {
            KeyPair {
                private_pem: include_bytes!(concat!(
                    "../tests/fixtures/test-only-",
                    $name,
                    "-private.pem"
                )),
                public_pem: include_bytes!(concat!(
                    "../tests/fixtures/test-only-",
                    $name,
                    "-public.pem"
                )),
                public_path: concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/test-only-",
                    $name,
                    "-public.pem"
                ),
            }
        };
    }

    const RSA: KeyPair = fixture_pair!("rsa");
    const EC_P256: KeyPair = fixture_pair!("ec-p256");
    const EC_P384: KeyPair = fixture_pair!("ec-p384");
    const ED25519: KeyPair = fixture_pair!("ed25519");
    /// A P-256 public key that signed nothing here.
    const EC_P256_OTHER_PUBLIC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test-only-ec-p256-other-public.pem"
    );

    /// The private key of `pair` as jsonwebtoken's signing key for `alg`.
    fn signing_key(pair: &KeyPair, alg: Algorithm) -> EncodingKey {
        match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pair.private_pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pair.private_pem),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pair.private_pem),
            AlgorithmFamily::Hmac => panic!("{alg:?} takes a secret"),
        }
        .unwrap_or_else(|e| panic!("fixture key for {alg:?}: {e}"))
    }

    fn public_key_config(path: impl AsRef<Path>, algorithm: Option<Algorithm>) -> JwtConfig {
        JwtConfig {
            secret: None,
            public_key_file: Some(path.as_ref().to_path_buf()),
            algorithm,
            ..jwt_config()
        }
    }

    // --- extraction ---------------------------------------------------------

    fn sources<'a>(
        authorization: Option<&'a [u8]>,
        cookies: &'a [&'a [u8]],
        query: Option<&'a [u8]>,
    ) -> TokenSources<'a> {
        TokenSources {
            authorization,
            cookies,
            query,
        }
    }

    /// The first candidate's token.
    fn extract(s: &TokenSources<'_>, cookie: Option<&str>) -> Option<String> {
        all(s, cookie).into_iter().next().map(|(_, token)| token)
    }

    /// Every candidate, with its source.
    fn all(s: &TokenSources<'_>, cookie: Option<&str>) -> Vec<(TokenSource, String)> {
        token_candidates(s, cookie)
            .map(|c| (c.source, c.token.into_owned()))
            .collect()
    }

    #[test]
    fn bearer_header() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"Bearer abc.def.ghi", Some("abc.def.ghi")),
            (b"bearer abc", Some("abc")),
            (b"BEARER \t abc  ", Some("abc")),
            (b"Basic dXNlcjpwYXNz", None),
            (b"Bearer", None),
            (b"Bearer   ", None),
            (b"Bearerabc", None),
            (b"", None),
        ];
        for (header, expected) in cases {
            let s = sources(Some(header), &[], None);
            assert_eq!(extract(&s, None).as_deref(), *expected, "{header:?}");
        }
    }

    #[test]
    fn cookie_source() {
        let headers: &[&[u8]] = &[b"theme=dark; jwt_token=\"quoted.value\"", b"jwt=plain"];
        let s = sources(None, headers, None);
        assert_eq!(extract(&s, Some("jwt")).as_deref(), Some("plain"));
        assert_eq!(
            extract(&s, Some("jwt_token")).as_deref(),
            Some("quoted.value")
        );
        assert_eq!(extract(&s, Some("theme")).as_deref(), Some("dark"));
        // Exact name match only; no cookie name configured means cookies are ignored.
        assert_eq!(extract(&s, Some("jw")), None);
        assert_eq!(extract(&s, Some("JWT")), None);
        assert_eq!(extract(&s, None), None);

        let headers: &[&[u8]] = &[b"a=1;jwt=first ; jwt=second", b"jwt=third"];
        let s = sources(None, headers, None);
        assert_eq!(extract(&s, Some("jwt")).as_deref(), Some("first"));

        // Empty (or empty quoted) cookie counts as absent and falls through to the query.
        for header in [&b"jwt="[..], b"jwt=\"\"", b"jwt"] {
            let headers: &[&[u8]] = &[header];
            let s = sources(None, headers, Some(b"token=q"));
            assert_eq!(extract(&s, Some("jwt")).as_deref(), Some("q"), "{header:?}");
        }
    }

    #[test]
    fn query_source() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"token=abc", Some("abc")),
            (b"a=1&token=abc&b=2", Some("abc")),
            (b"token=first&token=second", Some("first")),
            (b"token=a%2Eb%2ec+d", Some("a.b.c d")),
            (b"token=%zz", Some("%zz")),
            (b"token=", None),
            (b"token", None),
            (b"xtoken=abc&tokens=def", None),
            (b"", None),
        ];
        for (query, expected) in cases {
            let s = sources(None, &[], Some(query));
            assert_eq!(extract(&s, None).as_deref(), *expected, "{query:?}");
        }
        // Percent-decoded to invalid UTF-8: lossy, so it is present (and later invalid).
        let s = sources(None, &[], Some(b"token=%FF%FE"));
        assert_eq!(extract(&s, None).as_deref(), Some("\u{FFFD}\u{FFFD}"));
        // Borrowed when nothing needs decoding.
        let s = sources(None, &[], Some(b"token=abc"));
        assert!(matches!(
            token_candidates(&s, None).next().map(|c| c.token),
            Some(Cow::Borrowed("abc"))
        ));
    }

    #[test]
    fn non_utf8_header_and_cookie_are_lossy() {
        let s = sources(Some(b"Bearer \xff\xfe"), &[], None);
        assert_eq!(extract(&s, None).as_deref(), Some("\u{FFFD}\u{FFFD}"));
        let headers: &[&[u8]] = &[b"jwt=\xff"];
        let s = sources(None, headers, None);
        assert_eq!(extract(&s, Some("jwt")).as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn precedence_header_then_cookie_then_query() {
        let headers: &[&[u8]] = &[b"jwt=from-cookie"];
        let all = sources(
            Some(b"Bearer from-header"),
            headers,
            Some(b"token=from-query"),
        );
        assert_eq!(extract(&all, Some("jwt")).as_deref(), Some("from-header"));

        let no_header = sources(None, headers, Some(b"token=from-query"));
        assert_eq!(
            extract(&no_header, Some("jwt")).as_deref(),
            Some("from-cookie")
        );
        // Without JWT_COOKIE_NAME the cookie is not a source.
        assert_eq!(extract(&no_header, None).as_deref(), Some("from-query"));

        // A non-Bearer or empty Authorization header does not hide the other sources.
        let basic = sources(Some(b"Basic xyz"), headers, Some(b"token=from-query"));
        assert_eq!(extract(&basic, Some("jwt")).as_deref(), Some("from-cookie"));
        let empty = sources(Some(b"Bearer "), &[], Some(b"token=from-query"));
        assert_eq!(extract(&empty, None).as_deref(), Some("from-query"));

        assert_eq!(extract(&sources(None, &[], None), Some("jwt")), None);
    }

    #[test]
    fn every_candidate_in_order_and_capped() {
        use TokenSource::{Bearer, Cookie, Query};
        let owned = |v: &[(TokenSource, &str)]| -> Vec<(TokenSource, String)> {
            v.iter().map(|&(s, t)| (s, t.to_owned())).collect()
        };
        // A stale cookie, an empty one and a fresh one, across two headers.
        let headers: &[&[u8]] = &[b"jwt=stale; theme=dark; jwt=", b"jwt=fresh"];
        let s = sources(Some(b"Bearer b"), headers, Some(b"token=q"));
        assert_eq!(
            all(&s, Some("jwt")),
            owned(&[
                (Bearer, "b"),
                (Cookie, "stale"),
                (Cookie, "fresh"),
                (Query, "q")
            ])
        );
        // Hundreds of cookies: two are tried, and the query still is.
        let many: String = (0..500).map(|i| format!("jwt=c{i}; ")).collect();
        let headers: &[&[u8]] = &[many.as_bytes()];
        let s = sources(None, headers, Some(b"token=q"));
        assert_eq!(
            all(&s, Some("jwt")),
            owned(&[(Cookie, "c0"), (Cookie, "c1"), (Query, "q")])
        );
        let s = sources(Some(b"Bearer b"), headers, Some(b"token=q"));
        assert_eq!(all(&s, Some("jwt")).len(), MAX_TOKEN_CANDIDATES);
        // The query's later `token` parameters are not candidates.
        let s = sources(None, &[], Some(b"token=a&token=b"));
        assert_eq!(all(&s, None), owned(&[(Query, "a")]));
    }

    // --- validation: HMAC ----------------------------------------------------

    #[test]
    fn valid_hmac_tokens_of_every_size() {
        let auth = hmac_auth();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let exp = now() + 3600;
        for alg in HMAC_ALGORITHMS {
            let token = sign(alg, &key, &json!({"sub": "user-42", "exp": exp}));
            assert_eq!(
                auth.authenticate(&token),
                Ok(Identity {
                    user_id: "user-42".to_owned(),
                    expires_at: exp
                }),
                "{alg:?}"
            );
        }
        // JWT_ALGORITHM=HS512 still accepts HS256 (as the Go service did).
        let cfg = JwtConfig {
            algorithm: Some(Algorithm::HS512),
            ..jwt_config()
        };
        let auth = build(&cfg);
        let token = hs256(&json!({"sub": "u", "exp": exp}));
        assert!(auth.authenticate(&token).is_ok());
    }

    #[test]
    fn wrong_secret() {
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret"),
            &json!({"sub": "u", "exp": now() + 60}),
        );
        assert_eq!(
            hmac_auth().authenticate(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn expiry_and_leeway() {
        let exp = now() - 1;
        let token = hs256(&json!({"sub": "u", "exp": exp}));
        assert_eq!(hmac_auth().authenticate(&token), Err(AuthError::Expired));

        let cfg = JwtConfig {
            leeway: Duration::from_secs(30),
            ..jwt_config()
        };
        let auth = build(&cfg);
        let identity = auth.authenticate(&token).expect("accepted within leeway");
        assert_eq!(identity.expires_at, exp);

        let long_expired = hs256(&json!({"sub": "u", "exp": now() - 120}));
        assert_eq!(auth.authenticate(&long_expired), Err(AuthError::Expired));
    }

    #[test]
    fn fractional_exp_is_floored() {
        let exp = now() + 100;
        let token = hs256(&json!({"sub": "u", "exp": exp as f64 + 0.75}));
        assert_eq!(
            hmac_auth().authenticate(&token).map(|i| i.expires_at),
            Ok(exp)
        );
        // jsonwebtoken rounds now - 0.4 up to now; the floor is in the past.
        let token = hs256(&json!({"sub": "u", "exp": (now() - 1) as f64 + 0.6}));
        assert_eq!(hmac_auth().authenticate(&token), Err(AuthError::Expired));
    }

    #[test]
    fn not_before() {
        let exp = now() + 3600;
        let future = hs256(&json!({"sub": "u", "exp": exp, "nbf": now() + 60}));
        assert_eq!(
            hmac_auth().authenticate(&future),
            Err(AuthError::NotYetValid)
        );
        let past = hs256(&json!({"sub": "u", "exp": exp, "nbf": now() - 60}));
        assert!(hmac_auth().authenticate(&past).is_ok());

        let cfg = JwtConfig {
            leeway: Duration::from_secs(120),
            ..jwt_config()
        };
        assert!(build(&cfg).authenticate(&future).is_ok());

        let bad = hs256(&json!({"sub": "u", "exp": exp, "nbf": "soon"}));
        assert_eq!(hmac_auth().authenticate(&bad), Err(AuthError::Malformed));
    }

    #[test]
    fn exp_is_required_and_numeric() {
        let auth = hmac_auth();
        for claims in [
            json!({"sub": "u"}),
            json!({"sub": "u", "exp": null}),
            json!({"sub": "u", "exp": "9999999999"}),
            json!({"sub": "u", "exp": -5}),
            json!({"sub": "u", "exp": {"at": 1}}),
        ] {
            assert_eq!(
                auth.authenticate(&hs256(&claims)),
                Err(AuthError::MissingExp),
                "{claims}"
            );
        }
    }

    #[test]
    fn issuer_and_audience() {
        let exp = now() + 3600;
        let cfg = JwtConfig {
            issuer: Some("auth.example".to_owned()),
            audience: Some("ws".to_owned()),
            ..jwt_config()
        };
        let auth = build(&cfg);
        let ok = hs256(&json!({"sub": "u", "exp": exp, "iss": "auth.example", "aud": "ws"}));
        assert!(auth.authenticate(&ok).is_ok());
        let ok_list =
            hs256(&json!({"sub": "u", "exp": exp, "iss": "auth.example", "aud": ["x", "ws"]}));
        assert!(auth.authenticate(&ok_list).is_ok());

        let cases = [
            (
                json!({"sub": "u", "exp": exp, "iss": "evil", "aud": "ws"}),
                AuthError::WrongIssuer,
            ),
            (
                json!({"sub": "u", "exp": exp, "aud": "ws"}),
                AuthError::WrongIssuer,
            ),
            (
                json!({"sub": "u", "exp": exp, "iss": 7, "aud": "ws"}),
                AuthError::WrongIssuer,
            ),
            (
                json!({"sub": "u", "exp": exp, "iss": "auth.example", "aud": "other"}),
                AuthError::WrongAudience,
            ),
            (
                json!({"sub": "u", "exp": exp, "iss": "auth.example"}),
                AuthError::WrongAudience,
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                auth.authenticate(&hs256(&claims)),
                Err(expected),
                "{claims}"
            );
        }

        // Not configured: iss and aud are not checked at all.
        let any = hs256(&json!({"sub": "u", "exp": exp, "iss": "whoever", "aud": "anything"}));
        assert!(hmac_auth().authenticate(&any).is_ok());
    }

    #[test]
    fn user_claim_rules() {
        let exp = now() + 3600;
        let auth = hmac_auth();
        for claims in [
            json!({"exp": exp}),
            json!({"sub": "", "exp": exp}),
            json!({"sub": 42, "exp": exp}),
            json!({"sub": null, "exp": exp}),
            json!({"sub": ["u"], "exp": exp}),
        ] {
            assert_eq!(
                auth.authenticate(&hs256(&claims)),
                Err(AuthError::BadUserClaim),
                "{claims}"
            );
        }

        let cfg = JwtConfig {
            user_claim: "user_id".to_owned(),
            ..jwt_config()
        };
        let auth = build(&cfg);
        let token = hs256(&json!({"sub": "ignored", "user_id": "u:7", "exp": exp}));
        assert_eq!(
            auth.authenticate(&token).map(|i| i.user_id),
            Ok("u:7".to_owned())
        );
        let token = hs256(&json!({"sub": "only-sub", "exp": exp}));
        assert_eq!(auth.authenticate(&token), Err(AuthError::BadUserClaim));
    }

    #[test]
    fn alg_none_is_refused() {
        let claims = json!({"sub": "u", "exp": now() + 3600}).to_string();
        let auth = hmac_auth();
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS1"}"#,
        ] {
            let body = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.as_bytes()),
                URL_SAFE_NO_PAD.encode(claims.as_bytes())
            );
            for token in [format!("{body}."), format!("{body}.c2ln")] {
                assert_eq!(
                    auth.authenticate(&token),
                    Err(AuthError::WrongAlgorithm),
                    "{token}"
                );
            }
        }
    }

    #[test]
    fn malformed_tokens() {
        let auth = hmac_auth();
        let good = hs256(&json!({"sub": "u", "exp": now() + 3600}));
        let hs256_header = br#"{"alg":"HS256","typ":"JWT"}"#;
        let cases = [
            String::new(),
            "abc".to_owned(),
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            "!!!.@@@.###".to_owned(),
            format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(b"not json")),
            format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(br#"{"alg":7}"#)),
            // Signed correctly, so only the claims part is wrong.
            signed_raw(hs256_header, "!!notbase64!!"),
            signed_raw(hs256_header, &URL_SAFE_NO_PAD.encode(b"[1,2]")),
            signed_raw(hs256_header, &URL_SAFE_NO_PAD.encode(b"not json")),
        ];
        for token in cases {
            assert_eq!(
                auth.authenticate(&token),
                Err(AuthError::Malformed),
                "{token}"
            );
        }
        // A valid shape but a signature that is not base64url.
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[2] = "***";
        assert_eq!(
            auth.authenticate(&parts.join(".")),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn crit_header_is_refused_even_when_signed() {
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["b64".to_owned()]);
        let token = encode(
            &header,
            &json!({"sub": "u", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode");
        assert_eq!(hmac_auth().authenticate(&token), Err(AuthError::Malformed));
    }

    #[test]
    fn oversized_tokens() {
        let auth = hmac_auth();
        let huge = "a".repeat(64 * 1024);
        assert_eq!(auth.authenticate(&huge), Err(AuthError::Oversized));
        assert_eq!(
            auth.authenticate(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(AuthError::Oversized)
        );
        // Exactly 8 KiB is decoded (and is malformed here).
        assert_eq!(
            auth.authenticate(&"a".repeat(MAX_TOKEN_LEN)),
            Err(AuthError::Malformed)
        );
        // A real token just under the limit is fine.
        let padding = "x".repeat(MAX_TOKEN_LEN / 2);
        let token = hs256(&json!({"sub": "u", "exp": now() + 60, "pad": padding}));
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert!(auth.authenticate(&token).is_ok());
    }

    #[test]
    fn error_names_are_distinct() {
        let all = [
            AuthError::Malformed,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongAlgorithm,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingExp,
            AuthError::BadUserClaim,
            AuthError::Oversized,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(AuthError::as_str).collect();
        assert_eq!(names.len(), all.len());
        assert_eq!(AuthError::BadUserClaim.to_string(), "bad_user_claim");
    }

    // --- validation: public keys ----------------------------------------------

    #[test]
    fn every_algorithm_with_a_real_key_and_token() {
        let exp = now() + 600;
        let claims = json!({"sub": "keyed-user", "exp": exp});
        let expected = Ok(Identity {
            user_id: "keyed-user".to_owned(),
            expires_at: exp,
        });
        // HMAC: the secret takes all three, whatever JWT_ALGORITHM names.
        for alg in HMAC_ALGORITHMS {
            let cfg = JwtConfig {
                algorithm: Some(alg),
                ..jwt_config()
            };
            let token = sign(alg, &EncodingKey::from_secret(SECRET.as_bytes()), &claims);
            assert_eq!(build(&cfg).authenticate(&token), expected, "{alg:?}");
        }
        let public_key_cases = [
            (Algorithm::RS256, &RSA),
            (Algorithm::RS384, &RSA),
            (Algorithm::RS512, &RSA),
            (Algorithm::PS256, &RSA),
            (Algorithm::PS384, &RSA),
            (Algorithm::PS512, &RSA),
            (Algorithm::ES256, &EC_P256),
            (Algorithm::ES384, &EC_P384),
            (Algorithm::EdDSA, &ED25519),
        ];
        for (alg, pair) in public_key_cases {
            let auth = build(&public_key_config(pair.public_path, Some(alg)));
            let token = sign(alg, &signing_key(pair, alg), &claims);
            assert_eq!(auth.authenticate(&token), expected, "{alg:?}");
            // Exactly the configured algorithm: the key's other ones are refused.
            for other in public_key_cases
                .iter()
                .filter(|(o, p)| *o != alg && p.public_path == pair.public_path)
            {
                let token = sign(other.0, &signing_key(pair, other.0), &claims);
                assert_eq!(
                    auth.authenticate(&token),
                    Err(AuthError::WrongAlgorithm),
                    "{alg:?} key took {:?}",
                    other.0
                );
            }
            // Tampered claims.
            let parts: Vec<&str> = token.split('.').collect();
            let forged = URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": exp}).to_string());
            let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
            assert_eq!(
                auth.authenticate(&tampered),
                Err(AuthError::BadSignature),
                "{alg:?}"
            );
        }
        // Unset JWT_ALGORITHM: inferred from the key.
        for (pair, alg) in [
            (&RSA, Algorithm::RS256),
            (&EC_P256, Algorithm::ES256),
            (&EC_P384, Algorithm::ES384),
            (&ED25519, Algorithm::EdDSA),
        ] {
            let auth = build(&public_key_config(pair.public_path, None));
            let token = sign(alg, &signing_key(pair, alg), &claims);
            assert_eq!(auth.authenticate(&token), expected, "inferred {alg:?}");
        }
        // A key that did not sign the token.
        let auth = build(&public_key_config(EC_P256_OTHER_PUBLIC, None));
        let token = sign(
            Algorithm::ES256,
            &signing_key(&EC_P256, Algorithm::ES256),
            &claims,
        );
        assert_eq!(auth.authenticate(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn hmac_signed_with_public_key_text_is_refused() {
        let auth = build(&public_key_config(RSA.public_path, None));
        let claims = json!({"sub": "attacker", "exp": now() + 600});
        for alg in HMAC_ALGORITHMS {
            let token = sign(alg, &EncodingKey::from_secret(RSA.public_pem), &claims);
            assert_eq!(
                auth.authenticate(&token),
                Err(AuthError::WrongAlgorithm),
                "{alg:?}"
            );
        }
        // Even with a secret also configured, the public key decides.
        let cfg = JwtConfig {
            secret: Some(SECRET.to_owned()),
            ..public_key_config(RSA.public_path, None)
        };
        let auth = build(&cfg);
        assert_eq!(
            auth.authenticate(&hs256(&claims)),
            Err(AuthError::WrongAlgorithm)
        );
    }

    #[test]
    fn wrong_family_key_and_algorithm_is_a_config_error() {
        use Algorithm::*;
        let cases = [
            (RSA.public_path, [ES256, ES384, EdDSA, HS256]),
            (EC_P256.public_path, [RS256, ES384, EdDSA, PS256]),
            (EC_P384.public_path, [ES256, RS512, EdDSA, HS512]),
            (ED25519.public_path, [ES256, RS256, PS384, HS384]),
        ];
        for (path, algorithms) in cases {
            for alg in algorithms {
                let err = config_err(&public_key_config(path, Some(alg)));
                assert_eq!(err.variable, "JWT_ALGORITHM", "{alg:?}: {}", err.message);
                assert!(
                    err.message.contains("JWT_PUBLIC_KEY_FILE"),
                    "{}",
                    err.message
                );
            }
        }
        // A secret with a public-key algorithm.
        for alg in [RS256, PS512, ES256, ES384, EdDSA] {
            let cfg = JwtConfig {
                algorithm: Some(alg),
                ..jwt_config()
            };
            let err = config_err(&cfg);
            assert_eq!(err.variable, "JWT_ALGORITHM", "{alg:?}");
            assert!(
                err.message.contains("JWT_PUBLIC_KEY_FILE"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn weak_secrets_are_named_without_repeating_them() {
        for weak in [
            "Tiny5ecret",
            PLACEHOLDER_SECRET,
            &"q".repeat(MIN_SECRET_BYTES - 1),
        ] {
            let warning = weak_secret_warning(weak).expect("a warning");
            assert!(warning.contains("JWT_SECRET_KEY"), "{warning}");
            assert!(!warning.contains(weak), "{warning}");
        }
        assert_eq!(weak_secret_warning(&"x".repeat(MIN_SECRET_BYTES)), None);
    }

    #[test]
    fn bad_key_files_are_config_errors() {
        let dir = TempDir::new("badkeys");
        let missing = dir.0.join("missing.pem");
        let not_pem = dir.write("not.pem", b"hello");
        let private = dir.write("private.pem", RSA.private_pem);
        let garbage = dir.write(
            "garbage.pem",
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        for path in [&missing, &not_pem, &private, &garbage] {
            let err = config_err(&public_key_config(path, None));
            assert_eq!(err.variable, "JWT_PUBLIC_KEY_FILE", "{}", path.display());
        }

        let no_key = JwtConfig {
            secret: None,
            ..jwt_config()
        };
        assert_eq!(config_err(&no_key).variable, "JWT_SECRET_KEY");
        let empty = JwtConfig {
            secret: Some(String::new()),
            ..jwt_config()
        };
        assert_eq!(config_err(&empty).variable, "JWT_SECRET_KEY");
        let leeway = JwtConfig {
            leeway: Duration::from_secs(100 * 365 * 86400),
            ..jwt_config()
        };
        assert_eq!(config_err(&leeway).variable, "JWT_LEEWAY");
        let claim = JwtConfig {
            user_claim: String::new(),
            ..jwt_config()
        };
        assert_eq!(config_err(&claim).variable, "JWT_USER_CLAIM");
    }
}
