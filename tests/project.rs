//! The package itself (issue 2 item 1): the files a new machine needs, and a
//! `template.env` that lists every configuration variable of DESIGN.md section 4.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn project_files_exist() {
    for path in [
        "Cargo.toml",
        "src/main.rs",
        "src/lib.rs",
        "README.md",
        "template.env",
        ".ci/run",
        "Dockerfile",
        "fuzz",
    ] {
        assert!(Path::new(ROOT).join(path).exists(), "{path} is missing");
    }
}

#[test]
fn template_env_lists_every_variable() {
    let template =
        std::fs::read_to_string(Path::new(ROOT).join("template.env")).expect("read template.env");
    let variables = [
        "WS_HOST",
        "WS_PORT",
        "JWT_SECRET_KEY",
        "JWT_PUBLIC_KEY_FILE",
        "JWT_ALGORITHM",
        "JWT_USER_CLAIM",
        "JWT_ISSUER",
        "JWT_AUDIENCE",
        "JWT_LEEWAY",
        "JWT_COOKIE_NAME",
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_USERNAME",
        "REDIS_PASSWORD",
        "REDIS_DB",
        "REDIS_USE_TLS",
        "REDIS_TLS_CA_FILE",
        "REDIS_CHANNEL_PREFIX",
        "REDIS_PING_INTERVAL",
        "WS_PING_INTERVAL",
        "WS_PONG_WAIT",
        "WS_WRITE_WAIT",
        "WS_HANDSHAKE_TIMEOUT",
        "WS_MAX_MESSAGE_SIZE",
        "WS_MAX_CONNECTIONS",
        "WS_MAX_CONNECTIONS_PER_USER",
        "WS_SEND_BUFFER",
        "WS_ALLOWED_ORIGINS",
        "SHUTDOWN_TIMEOUT",
        "LOGGER_LEVEL",
        "LOGGER_ENCODING",
    ];
    let missing: Vec<&str> = variables
        .iter()
        .copied()
        .filter(|v| {
            !template.lines().any(|l| {
                l.trim_start_matches(['#', ' '])
                    .starts_with(&format!("{v}="))
            })
        })
        .collect();
    assert!(missing.is_empty(), "template.env does not list {missing:?}");
}
