//! The `ws-notify` binary: the command line lives in the library
//! (`ws_notify::cli`); without arguments it runs the server.

use std::process::ExitCode;

fn main() -> ExitCode {
    ws_notify::cli::main(std::env::args_os())
}
