//! `ws-notify token`: signs a development token with `JWT_SECRET_KEY`, shaped
//! to pass this gateway's own checks: the user goes into `JWT_USER_CLAIM`,
//! `iss`/`aud` are set from `JWT_ISSUER`/`JWT_AUDIENCE`, and the algorithm is
//! `JWT_ALGORITHM` when it is an HMAC one (HS256 otherwise).

use std::process::ExitCode;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::{Arg, EXIT_USAGE, ParseStop, Parser};
use crate::clock;
use crate::config::{Config, parse_duration};

pub const USAGE: &str = "\
Usage: ws-notify token --sub <user> [--ttl <duration>] [--claim <key>=<value>]...

Prints a token signed with JWT_SECRET_KEY from the environment (HS256, or
JWT_ALGORITHM if it is HS384/HS512), for development and tests.

  --sub <user>            the user id, put in the claim named by JWT_USER_CLAIM (default sub)
  --ttl <duration>        lifetime as a Go duration: 30s, 15m, 1h, 24h (default 1h)
  --claim <key>=<value>   an extra claim (repeatable); the value is JSON if it
                          parses as JSON (42, true, [\"a\"]), a string otherwise.
                          Given last, so it may override exp, iat or the user claim.

iss and aud are set from JWT_ISSUER and JWT_AUDIENCE when those are set.
Exit codes: 0 printed, 2 a bad argument or configuration.";

/// Default token lifetime.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The parsed `token` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenArgs {
    pub sub: String,
    pub ttl: Duration,
    /// `--claim key=value` pairs, values already turned into JSON.
    pub claims: Vec<(String, Value)>,
}

pub fn parse(parser: &mut Parser) -> Result<TokenArgs, ParseStop> {
    let mut sub = None;
    let mut ttl = DEFAULT_TTL;
    let mut claims = Vec::new();
    while let Some(arg) = parser.next_arg()? {
        match arg {
            Arg::Option(name, inline) => match name.as_str() {
                "sub" => sub = Some(parser.value("sub", inline)?),
                "ttl" => {
                    let text = parser.value("ttl", inline)?;
                    ttl = parse_duration(&text)
                        .map_err(|e| ParseStop::Usage(format!("--ttl: {e}")))?;
                    if ttl < Duration::from_secs(1) {
                        return Err(ParseStop::Usage(format!(
                            "--ttl: {text:?} is shorter than 1s (exp has a resolution of seconds)"
                        )));
                    }
                }
                "claim" => {
                    let text = parser.value("claim", inline)?;
                    claims.push(parse_claim(&text)?);
                }
                _ => return Err(parser.unknown_option(&name)),
            },
            Arg::Positional(arg) => return Err(parser.unexpected(&arg)),
        }
    }
    match sub {
        Some(sub) if !sub.is_empty() => Ok(TokenArgs { sub, ttl, claims }),
        Some(_) => Err(ParseStop::Usage("--sub must not be empty".to_string())),
        None => Err(ParseStop::Usage("--sub <user> is required".to_string())),
    }
}

/// `key=value`: the value as JSON when it parses, else as a string.
fn parse_claim(text: &str) -> Result<(String, Value), ParseStop> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(ParseStop::Usage(format!(
            "--claim {text:?} is not key=value"
        )));
    };
    if key.is_empty() {
        return Err(ParseStop::Usage(format!(
            "--claim {text:?} has an empty key"
        )));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

pub fn run(args: &TokenArgs) -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-notify token: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match sign(&config, args, clock::unix_secs_now()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ws-notify token: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The signed token for `args` at `now` (Unix seconds).
pub fn sign(config: &Config, args: &TokenArgs, now: u64) -> Result<String, String> {
    let jwt = &config.jwt;
    if jwt.public_key_file.is_some() {
        return Err(
            "JWT_PUBLIC_KEY_FILE is set, so the gateway accepts only tokens signed with the \
             matching private key, which this command does not have"
                .to_string(),
        );
    }
    let Some(secret) = jwt.secret.as_deref() else {
        return Err("JWT_SECRET_KEY is not set".to_string());
    };
    let algorithm = match jwt.algorithm {
        None => Algorithm::HS256,
        Some(alg @ (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)) => alg,
        Some(other) => {
            return Err(format!(
                "JWT_ALGORITHM is {other:?}; this command signs HMAC tokens (HS256/HS384/HS512) only"
            ));
        }
    };
    let mut claims = Map::new();
    claims.insert(jwt.user_claim.clone(), Value::from(args.sub.as_str()));
    claims.insert("iat".to_string(), Value::from(now));
    claims.insert(
        "exp".to_string(),
        Value::from(now + args.ttl.as_secs().max(1)),
    );
    if let Some(issuer) = &jwt.issuer {
        claims.insert("iss".to_string(), Value::from(issuer.as_str()));
    }
    if let Some(audience) = &jwt.audience {
        claims.insert("aud".to_string(), Value::from(audience.as_str()));
    }
    for (key, value) in &args.claims {
        claims.insert(key.clone(), value.clone());
    }
    jsonwebtoken::encode(
        &Header::new(algorithm),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;

    fn config(pairs: &[(&str, &str)]) -> Config {
        Config::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
        .expect("valid test configuration")
    }

    fn args(sub: &str, claims: &[(&str, Value)]) -> TokenArgs {
        TokenArgs {
            sub: sub.to_string(),
            ttl: DEFAULT_TTL,
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn signed_token_passes_the_gateway_checks() {
        let cfg = config(&[
            ("JWT_SECRET_KEY", "s3cret"),
            ("JWT_USER_CLAIM", "user_id"),
            ("JWT_ISSUER", "https://issuer.example"),
            ("JWT_AUDIENCE", "ws"),
            ("JWT_ALGORITHM", "HS512"),
        ]);
        let token = sign(&cfg, &args("alice", &[]), clock::unix_secs_now()).unwrap();
        let identity = Authenticator::new(&cfg.jwt)
            .unwrap()
            .authenticate(&token)
            .unwrap_or_else(|e| panic!("token refused: {e:?}"));
        assert_eq!(identity.user_id, "alice");
    }

    #[test]
    fn expired_or_foreign_tokens_are_refused() {
        let cfg = config(&[("JWT_SECRET_KEY", "s3cret")]);
        let old = sign(&cfg, &args("bob", &[]), clock::unix_secs_now() - 7200).unwrap();
        let auth = Authenticator::new(&cfg.jwt).unwrap();
        assert!(auth.authenticate(&old).is_err());
        let other = config(&[("JWT_SECRET_KEY", "another")]);
        let token = sign(&other, &args("bob", &[]), clock::unix_secs_now()).unwrap();
        assert!(auth.authenticate(&token).is_err());
    }

    #[test]
    fn extra_claims_are_json_or_strings_and_come_last() {
        assert_eq!(
            parse_claim("n=42").unwrap(),
            ("n".to_string(), Value::from(42))
        );
        assert_eq!(
            parse_claim("role=admin").unwrap(),
            ("role".to_string(), Value::from("admin"))
        );
        assert_eq!(
            parse_claim("eq=a=b").unwrap(),
            ("eq".to_string(), Value::from("a=b"))
        );
        assert!(parse_claim("novalue").is_err());
        assert!(parse_claim("=x").is_err());

        let cfg = config(&[("JWT_SECRET_KEY", "s3cret")]);
        let now = clock::unix_secs_now();
        let token = sign(&cfg, &args("carol", &[("exp", Value::from(now - 60))]), now).unwrap();
        // The overriding exp is in the past: refused.
        assert!(
            Authenticator::new(&cfg.jwt)
                .unwrap()
                .authenticate(&token)
                .is_err()
        );
    }

    #[test]
    fn asymmetric_configuration_is_an_error() {
        let cfg = config(&[("JWT_SECRET_KEY", "s3cret"), ("JWT_ALGORITHM", "RS256")]);
        assert!(sign(&cfg, &args("a", &[]), 0).unwrap_err().contains("HMAC"));
    }
}
