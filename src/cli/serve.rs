//! `ws-notify [serve]`: configuration (exit 2 on a bad value), logging, then
//! the event loop on this thread until shutdown.

use std::process::ExitCode;

use super::{EXIT_FAILURE, EXIT_USAGE, ParseStop, Parser};
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::logging;
use crate::redis_reader;
use crate::server::Server;

pub const USAGE: &str = "\
Usage: ws-notify [serve]

Runs the gateway. All configuration comes from environment variables (see
template.env and the README): WS_HOST/WS_PORT, JWT_SECRET_KEY, REDIS_URL or
REDIS_HOST/REDIS_PORT, ... Stops gracefully on SIGINT/SIGTERM.

Exit codes: 0 after a graceful shutdown, 1 if the listener cannot be bound or
the loop fails, 2 for a configuration error (the message names the variable).";

/// `serve` takes no arguments.
pub fn parse(parser: &mut Parser) -> Result<(), ParseStop> {
    parser.no_arguments()
}

/// Runs the server until it shuts down.
pub fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            report_config_error(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(config.log_level, config.log_encoding);
    log_startup(&config);
    let authenticator = match Authenticator::new(&config.jwt) {
        Ok(authenticator) => authenticator,
        Err(e) => {
            // Logged (stderr, in the chosen encoding) like the errors found earlier.
            log::error!(
                variable = e.variable,
                error:% = e;
                "invalid configuration"
            );
            logging::flush();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Checked before binding, so that an unusable REDIS_TLS_CA_FILE is reported
    // as the configuration error it is rather than as a failure to listen.
    if let Err(e) = redis_reader::build_client(&config.redis) {
        // The message names the variable (REDIS_TLS_CA_FILE, or the address's).
        log::error!(error:% = e; "invalid configuration");
        logging::flush();
        return ExitCode::from(EXIT_USAGE);
    }
    let listen = config.listen_addr_text();
    let server = match Server::bind(config, authenticator) {
        Ok(server) => server,
        Err(e) => {
            log::error!(
                address = listen.as_str(),
                error:% = e;
                "cannot listen (WS_HOST/WS_PORT, or WS_ADMIN_ADDR when the error names it)"
            );
            logging::flush();
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(error:% = e; "event loop failed");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    // The log writer thread dies with the process: let it write the last lines.
    logging::flush();
    code
}

/// A configuration error before logging is set up: a JSON line on stderr when
/// `LOGGER_ENCODING=json` is set and valid (so a log pipeline sees it as one
/// record), plain text otherwise.
fn report_config_error(error: &ConfigError) {
    let json = std::env::var("LOGGER_ENCODING")
        .is_ok_and(|encoding| encoding.trim().eq_ignore_ascii_case("json"));
    if json {
        logging::print_config_error_json(error.variable, &error.to_string());
    } else {
        eprintln!("ws-notify: invalid configuration: {error}");
    }
}

/// One line with the version and the effective configuration. Secrets are never
/// printed: only whether `JWT_SECRET_KEY` and the Redis password are set.
fn log_startup(config: &Config) {
    let jwt = &config.jwt;
    let redis = &config.redis;
    let algorithm = jwt.algorithm.map(|a| format!("{a:?}"));
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let (public_key_file, tls_ca_file) = (path(&jwt.public_key_file), path(&redis.tls_ca_file));
    let cluster_nodes = redis.cluster_nodes_text();
    log::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = config.listen_addr_text().as_str(),
        admin_addr = config.admin_addr_text().unwrap_or_default().as_str(),
        jwt_secret_key = if jwt.secret.is_some() { "***" } else { "" },
        jwt_public_key_file = public_key_file.as_str(),
        jwt_algorithm = algorithm.as_deref().unwrap_or("inferred"),
        jwt_user_claim = jwt.user_claim.as_str(),
        jwt_issuer = jwt.issuer.as_deref().unwrap_or(""),
        jwt_audience = jwt.audience.as_deref().unwrap_or(""),
        jwt_leeway:? = jwt.leeway,
        jwt_cookie_name = jwt.cookie_name.as_deref().unwrap_or(""),
        redis_host = redis.host.as_str(),
        redis_port = redis.port,
        redis_username = redis.username.as_deref().unwrap_or(""),
        redis_password = if redis.password.is_some() { "***" } else { "" },
        redis_db = redis.db,
        redis_use_tls = redis.use_tls,
        redis_tls_ca_file = tls_ca_file.as_str(),
        redis_channel_prefix = redis.channel_prefix.as_str(),
        redis_ping_interval:? = redis.ping_interval,
        redis_reconnect_max:? = redis.reconnect_max,
        redis_subscribe_mode = redis.subscribe_mode.as_str(),
        redis_cluster_nodes = cluster_nodes.as_str(),
        redis_unsubscribe_linger:? = redis.unsubscribe_linger,
        ping_interval:? = config.ping_interval,
        pong_wait:? = config.pong_wait,
        write_wait:? = config.write_wait,
        handshake_timeout:? = config.handshake_timeout,
        max_message_size = config.max_message_size,
        max_connections = config.max_connections,
        max_connections_per_user = config.max_connections_per_user,
        send_buffer = config.send_buffer,
        send_buffer_bytes = config.send_buffer_bytes,
        history_size = config.history_size,
        history_ttl:? = config.history_ttl,
        token_expiry_notice:? = config.token_expiry_notice,
        allowed_origins = config.allowed_origins.join(",").as_str(),
        loop_nice = config.loop_nice,
        shutdown_timeout:? = config.shutdown_timeout,
        shutdown_drain:? = config.shutdown_drain,
        log_level = config.log_level.as_str(),
        log_encoding:? = config.log_encoding;
        "starting ws-notify"
    );
}
