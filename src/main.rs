//! Start-up: configuration (exit 2 on a bad value), logging, the event loop.

use std::process::ExitCode;

use ws_notify::auth::Authenticator;
use ws_notify::config::Config;
use ws_notify::logging;
use ws_notify::server::{self, Server};

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-notify: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_level, config.log_encoding);
    let authenticator = match Authenticator::new(&config.jwt) {
        Ok(authenticator) => authenticator,
        Err(e) => {
            log::error!("invalid configuration: {e}");
            eprintln!("ws-notify: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    server::raise_open_file_limit(config.max_connections);
    let listen = config.listen_addr_text();
    let server = match Server::bind(config, authenticator) {
        Ok(server) => server,
        Err(e) => {
            log::error!("cannot listen on {listen} (WS_HOST/WS_PORT): {e}");
            return ExitCode::from(1);
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::from(1)
        }
    }
}
