//! Every `JWT_ALGORITHM` against the real binary, each with a real key and a real
//! token signed by jsonwebtoken (committed test-only keys, tests/fixtures), and a
//! key whose family does not fit the algorithm stopping the server at start.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};

/// A file of the committed test-only key material.
fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/test-only-{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A token for `sub` signed with the private key of the fixture pair `pair`.
fn signed(alg: Algorithm, pair: &str, sub: &str) -> String {
    let pem = std::fs::read(fixture(&format!("{pair}-private.pem"))).expect("fixture key");
    let key = match alg.family() {
        AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(&pem),
        AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
        AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
        AlgorithmFamily::Hmac => panic!("{alg:?} takes a secret"),
    }
    .expect("fixture key parses");
    jsonwebtoken::encode(&Header::new(alg), &claims(sub, 600), &key).expect("sign")
}

#[test]
fn every_algorithm_with_a_real_key_and_token() {
    let redis = RedisServer::start();
    // (JWT_ALGORITHM as an operator might spell it, algorithm, key pair)
    let public_key_cases = [
        ("RS256", Algorithm::RS256, "rsa"),
        ("rs384", Algorithm::RS384, "rsa"),
        ("RS512", Algorithm::RS512, "rsa"),
        ("PS256", Algorithm::PS256, "rsa"),
        ("ps384", Algorithm::PS384, "rsa"),
        ("PS512", Algorithm::PS512, "rsa"),
        ("ES256", Algorithm::ES256, "ec-p256"),
        ("es384", Algorithm::ES384, "ec-p384"),
        ("EdDSA", Algorithm::EdDSA, "ed25519"),
    ];
    for (name, alg, pair) in public_key_cases {
        let key_file = fixture(&format!("{pair}-public.pem"));
        let gw = Gateway::start(
            redis.port,
            &[
                ("JWT_SECRET_KEY", UNSET),
                ("JWT_PUBLIC_KEY_FILE", &key_file),
                ("JWT_ALGORITHM", name),
            ],
        );
        let (_ws, hello) = ws_open(gw.port, &signed(alg, pair, "keyed"));
        assert_eq!(hello["user_id"], "keyed", "{name}");
        // An HMAC token signed with the public key's text is refused.
        let pem = std::fs::read_to_string(&key_file).expect("public key");
        let confused = token_alg(&pem, Algorithm::HS256, &claims("keyed", 600));
        let (status, _) = refused(ws_connect(gw.port, &confused));
        assert_eq!(status, 401, "{name}: HS256 with the public key as secret");
    }
    for (name, alg) in [
        ("HS256", Algorithm::HS256),
        ("hs384", Algorithm::HS384),
        ("HS512", Algorithm::HS512),
    ] {
        let gw = Gateway::start(redis.port, &[("JWT_ALGORITHM", name)]);
        let (_ws, hello) = ws_open(gw.port, &token_alg(&gw.secret, alg, &claims("mac", 600)));
        assert_eq!(hello["user_id"], "mac", "{name}");
    }
}

#[test]
fn a_key_that_does_not_fit_the_algorithm_stops_the_start() {
    let cases = [
        ("rsa", "ES256"),
        ("rsa", "EdDSA"),
        ("ec-p256", "ES384"),
        ("ec-p256", "RS256"),
        ("ec-p384", "ES256"),
        ("ed25519", "PS256"),
        ("ed25519", "HS256"),
    ];
    for (pair, alg) in cases {
        let key_file = fixture(&format!("{pair}-public.pem"));
        let (code, output) = Gateway::run_expect_exit(&[
            ("JWT_SECRET_KEY", UNSET),
            ("JWT_PUBLIC_KEY_FILE", &key_file),
            ("JWT_ALGORITHM", alg),
        ]);
        assert_eq!(code, Some(2), "{pair} with {alg}: {output}");
        for variable in ["JWT_ALGORITHM", "JWT_PUBLIC_KEY_FILE"] {
            assert!(output.contains(variable), "{pair} with {alg}: {output}");
        }
    }
    // A secret with a public-key algorithm names both variables too.
    let (code, output) = Gateway::run_expect_exit(&[("JWT_ALGORITHM", "ES384")]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("JWT_ALGORITHM") && output.contains("JWT_PUBLIC_KEY_FILE"),
        "{output}"
    );
    // An unknown name lists the supported ones.
    let (code, output) = Gateway::run_expect_exit(&[("JWT_ALGORITHM", "ES512")]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("JWT_ALGORITHM") && output.contains("PS512"),
        "{output}"
    );
}
