//! `ws-notify history-function`: prints the Redis Functions library
//! `ws_notify` with the configured `WS_HISTORY_SIZE` and `WS_HISTORY_TTL`, for
//! an operator to load by hand (README: "Publishing with history").

use std::process::ExitCode;

use super::{EXIT_USAGE, ParseStop, Parser};
use crate::history::library_code;

pub const USAGE: &str = "\
Usage: ws-notify history-function

Prints the Redis Functions library ws_notify (Lua, Redis 7.0+) with the
history size and TTL of WS_HISTORY_SIZE and WS_HISTORY_TTL (defaults 100 and
24h when history is off), as the gateway loads it at start. Load it by hand:

  ws-notify history-function | redis-cli -x FUNCTION LOAD REPLACE

Exit codes: 0 printed, 2 a bad argument or configuration.";

/// Size written into the library when `WS_HISTORY_SIZE` is 0 (history off).
const DEFAULT_SIZE: usize = 100;

pub fn parse(parser: &mut Parser) -> Result<(), ParseStop> {
    parser.no_arguments()
}

pub fn run() -> ExitCode {
    let config = match super::publish::publisher_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-notify history-function: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let size = match config.history_size {
        0 => DEFAULT_SIZE,
        size => size,
    };
    print!("{}", library_code(size, config.history_ttl));
    ExitCode::SUCCESS
}
