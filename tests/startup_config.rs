//! Start-up checks of the configuration against the real binary: what stops the
//! server (exit 2, naming the variables), what it warns about, and that neither
//! ever repeats a secret.

mod common;

use common::*;

/// The committed test-only CA certificate (tests/fixtures).
fn ca_fixture() -> String {
    format!(
        "{}/tests/fixtures/test-only-ca-cert.pem",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn cookie_auth_without_an_origin_list_is_refused_at_start() {
    let (code, output) = Gateway::run_expect_exit(&[("JWT_COOKIE_NAME", "session")]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("JWT_COOKIE_NAME") && output.contains("WS_ALLOWED_ORIGINS"),
        "{output}"
    );
    // With a list it starts.
    let redis = RedisServer::start();
    let gw = Gateway::start(
        redis.port,
        &[
            ("JWT_COOKIE_NAME", "session"),
            ("WS_ALLOWED_ORIGINS", "https://app.example"),
        ],
    );
    assert_eq!(gw.health().0, 200);
}

#[test]
fn configuration_errors_never_repeat_a_secret() {
    const SECRET: &str = "S3cretPw-4b1d";
    let bad_urls = [
        format!("redis://:{SECRET}"),
        format!("redis://user:{SECRET}"),
        format!("redis://:{SECRET}/0"),
        format!("redis://:{SECRET}:6379"),
        format!("redis://[{SECRET}]"),
        format!("redis://user:{SECRET}@host:80x"),
        format!("redis://user:{SECRET}@host/{SECRET}"),
        format!("redis://user:{SECRET}@my host"),
        format!("http://user:{SECRET}@host"),
        SECRET.to_string(),
    ];
    for url in &bad_urls {
        let (code, output) = Gateway::run_expect_exit(&[("REDIS_URL", url)]);
        assert_eq!(code, Some(2), "{url}: {output}");
        assert!(output.contains("REDIS_URL"), "{url}: {output}");
        assert!(!output.contains(SECRET), "{url} repeated: {output}");
    }
    // Another variable's error with both secrets set.
    for (variable, value) in [
        ("WS_PORT", "80x"),
        ("REDIS_TLS_CA_FILE", "/nonexistent.pem"),
    ] {
        let (code, output) = Gateway::run_expect_exit(&[
            ("JWT_SECRET_KEY", SECRET),
            ("REDIS_PASSWORD", SECRET),
            ("REDIS_USE_TLS", "true"),
            (variable, value),
        ]);
        assert_eq!(code, Some(2), "{variable}: {output}");
        assert!(output.contains(variable), "{output}");
        assert!(!output.contains(SECRET), "{variable}: {output}");
    }
}

#[test]
fn weak_secrets_are_warned_about_without_showing_them() {
    let redis = RedisServer::start();
    let placeholder = "dev-secret-change-me";
    let short = "Short-S3cret-9f";
    for (secret, why) in [
        (placeholder, "placeholder"),
        (short, "shorter than 32 bytes"),
    ] {
        let gw = Gateway::start(redis.port, &[("JWT_SECRET_KEY", secret)]);
        wait_until(PROMPT, "the weak-secret warning", || {
            gw.logs()
                .lines()
                .any(|l| l.contains("\"warn\"") && l.contains("JWT_SECRET_KEY") && l.contains(why))
        });
        assert!(!gw.logs().contains(secret), "{}", gw.logs());
    }
    // A 32-byte random secret (the test default) passes without a warning; the
    // line that follows the check shows that it ran.
    let gw = Gateway::start(redis.port, &[]);
    assert_eq!(gw.secret.len(), 32);
    wait_until(PROMPT, "the listening line", || {
        gw.logs().contains(r#""message":"listening""#)
    });
    assert!(!gw.logs().contains("JWT_SECRET_KEY"), "{}", gw.logs());
}

#[test]
fn an_unusable_tls_ca_file_is_a_configuration_error() {
    let not_pem = format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"));
    for (path, what) in [
        ("/nonexistent/ca.pem", "missing"),
        (not_pem.as_str(), "no certificate"),
        (env!("CARGO_MANIFEST_DIR"), "a directory"),
    ] {
        let (code, output) =
            Gateway::run_expect_exit(&[("REDIS_USE_TLS", "true"), ("REDIS_TLS_CA_FILE", path)]);
        assert_eq!(code, Some(2), "{what}: {output}");
        assert!(output.contains("REDIS_TLS_CA_FILE"), "{what}: {output}");
        assert!(!output.contains("cannot listen"), "{what}: {output}");
    }
    // A file that holds a certificate gets past the check: the server starts and
    // serves while it tries to reach Redis over TLS.
    let redis = RedisServer::start();
    let mut gw = Gateway::start(
        redis.port,
        &[
            ("REDIS_USE_TLS", "true"),
            ("REDIS_TLS_CA_FILE", &ca_fixture()),
        ],
    );
    assert!(gw.is_running(), "{}", gw.logs());
}
