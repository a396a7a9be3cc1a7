//! `ws-notify [serve]`: configuration (exit 2 on a bad value), logging, then
//! the event loop on this thread until shutdown.

use std::process::ExitCode;

use super::{Arg, EXIT_FAILURE, EXIT_USAGE, ParseStop, Parser};
use crate::auth::Authenticator;
use crate::config::Config;
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
    match parser.next_arg()? {
        None => Ok(()),
        Some(Arg::Option(name, _)) => Err(parser.unknown_option(&name)),
        Some(Arg::Positional(arg)) => Err(parser.unexpected(&arg)),
    }
}

/// Runs the server until it shuts down.
pub fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-notify: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(config.log_level, config.log_encoding);
    let authenticator = match Authenticator::new(&config.jwt) {
        Ok(authenticator) => authenticator,
        Err(e) => {
            log::error!("invalid configuration: {e}");
            logging::flush();
            eprintln!("ws-notify: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Checked before binding, so that an unusable REDIS_TLS_CA_FILE is reported
    // as the configuration error it is rather than as a failure to listen.
    if let Err(e) = redis_reader::build_client(&config.redis) {
        log::error!("invalid configuration: {e}");
        logging::flush();
        eprintln!("ws-notify: invalid configuration: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let listen = config.listen_addr_text();
    let server = match Server::bind(config, authenticator) {
        Ok(server) => server,
        Err(e) => {
            log::error!("cannot listen on {listen} (WS_HOST/WS_PORT): {e}");
            logging::flush();
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    // The log writer thread dies with the process: let it write the last lines.
    logging::flush();
    code
}
