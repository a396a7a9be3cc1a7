//! The command line: `ws-notify [serve]` runs the gateway, and a few small
//! operator tools ship in the same binary so that a container (no shell, no
//! curl) or a developer needs nothing else:
//!
//! - `token`: sign a development JWT with `JWT_SECRET_KEY` ([`token`]);
//! - `listen`: a debugging WebSocket client that prints messages as JSON lines ([`listen`]);
//! - `publish`: publish a test notification to the configured Redis ([`publish`]);
//! - `history-function`: print the Redis function library for history ([`history_function`]);
//! - `healthcheck`: GET `/health`, exit 0 on 200 (the image's `HEALTHCHECK`) ([`healthcheck`]).
//!
//! Arguments are parsed by hand (a dozen options do not need a parser crate).
//! Exit codes follow the server's: 0 success, 1 a runtime failure (an
//! unhealthy gateway, an abnormal close, Redis unreachable), 2 a usage or
//! configuration error, after printing the usage on stderr.
//!
//! Runs on the main thread before anything else; `serve` then hands the
//! thread to the event loop.

use std::ffi::OsString;
use std::fmt;
use std::process::ExitCode;

pub mod healthcheck;
pub mod history_function;
pub mod listen;
pub mod publish;
pub mod serve;
pub mod token;

/// The version printed by `--version` (the package version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit code of a usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;

/// Port the gateway listens on when `WS_PORT` is unset (README: "Configuration").
const DEFAULT_PORT: u16 = 8081;

const MAIN_USAGE: &str = "\
Usage:
  ws-notify [serve]                                    run the gateway (configured by the environment; see template.env)
  ws-notify token --sub <user> [--ttl 1h] [--claim key=value]...
                                                       print a development token signed with JWT_SECRET_KEY
  ws-notify listen [--url ws://127.0.0.1:8081/ws] [--token <jwt>]
                                                       connect and print every message as a JSON line
  ws-notify publish <user> <type> [<json-payload>]     publish a notification to the configured Redis
  ws-notify history-function                           print the Redis function library that keeps history
  ws-notify healthcheck [--url http://127.0.0.1:8081/health]
                                                       exit 0 if /health answers 200, 1 otherwise
  ws-notify help [<command>]   -h, --help   -V, --version

Run 'ws-notify <command> --help' for the details of a command.";

/// A subcommand, for its usage text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Serve,
    Token,
    Listen,
    Publish,
    HistoryFunction,
    Healthcheck,
}

impl Command {
    fn from_name(name: &str) -> Option<Command> {
        Some(match name {
            "serve" => Command::Serve,
            "token" => Command::Token,
            "listen" => Command::Listen,
            "publish" => Command::Publish,
            "history-function" => Command::HistoryFunction,
            "healthcheck" => Command::Healthcheck,
            _ => return None,
        })
    }

    /// The command's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Command::Serve => "serve",
            Command::Token => "token",
            Command::Listen => "listen",
            Command::Publish => "publish",
            Command::HistoryFunction => "history-function",
            Command::Healthcheck => "healthcheck",
        }
    }

    /// The command's `--help` text.
    pub fn usage(self) -> &'static str {
        match self {
            Command::Serve => serve::USAGE,
            Command::Token => token::USAGE,
            Command::Listen => listen::USAGE,
            Command::Publish => publish::USAGE,
            Command::HistoryFunction => history_function::USAGE,
            Command::Healthcheck => healthcheck::USAGE,
        }
    }
}

/// What the command line asks for, fully parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Print the top-level help (`--help`, `help`).
    Help,
    /// Print a command's help (`<command> --help`, `help <command>`).
    CommandHelp(Command),
    /// Print the version (`--version`).
    Version,
    Serve,
    Token(token::TokenArgs),
    Listen(listen::ListenArgs),
    Publish(publish::PublishArgs),
    HistoryFunction,
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// A bad command line: printed with the usage of `command` (or the
/// top-level usage), exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub command: Option<Command>,
    pub message: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}

/// Parses and runs the command line (`args` includes the program name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let invocation = match parse(args.into_iter().skip(1)) {
        Ok(invocation) => invocation,
        Err(e) => {
            let (usage, prefix) = match e.command {
                Some(command) => (command.usage(), format!("ws-notify {}", command.name())),
                None => (MAIN_USAGE, "ws-notify".to_string()),
            };
            eprintln!("{prefix}: {e}\n\n{usage}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match invocation {
        Invocation::Help => {
            println!(
                "ws-notify {VERSION}: Redis pub/sub to authenticated WebSocket clients\n\n{MAIN_USAGE}"
            );
            ExitCode::SUCCESS
        }
        Invocation::CommandHelp(command) => {
            println!("{}", command.usage());
            ExitCode::SUCCESS
        }
        Invocation::Version => {
            println!("ws-notify {VERSION}");
            ExitCode::SUCCESS
        }
        Invocation::Serve => serve::run(),
        Invocation::Token(args) => token::run(&args),
        Invocation::Listen(args) => listen::run(&args),
        Invocation::Publish(args) => publish::run(&args),
        Invocation::HistoryFunction => history_function::run(),
        Invocation::Healthcheck(args) => healthcheck::run(&args),
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, UsageError> {
    let mut strings = Vec::new();
    for arg in args {
        match arg.into_string() {
            Ok(s) => strings.push(s),
            Err(raw) => {
                return Err(UsageError {
                    command: None,
                    message: format!("argument {raw:?} is not valid UTF-8"),
                });
            }
        }
    }
    let mut strings = strings.into_iter();
    let Some(first) = strings.next() else {
        return Ok(Invocation::Serve);
    };
    let rest: Vec<String> = strings.collect();
    match first.as_str() {
        "-h" | "--help" => Ok(Invocation::Help),
        "-V" | "--version" => Ok(Invocation::Version),
        "help" => match rest.as_slice() {
            [] => Ok(Invocation::Help),
            [name] => match Command::from_name(name) {
                Some(command) => Ok(Invocation::CommandHelp(command)),
                None => Err(UsageError {
                    command: None,
                    message: format!("unknown command {name:?}"),
                }),
            },
            _ => Err(UsageError {
                command: None,
                message: "help takes at most one command name".to_string(),
            }),
        },
        name => {
            let Some(command) = Command::from_name(name) else {
                let message = if name.starts_with('-') {
                    format!("unknown option {name:?}")
                } else {
                    format!("unknown command {name:?}")
                };
                return Err(UsageError {
                    command: None,
                    message,
                });
            };
            let mut parser = Parser::new(command, rest);
            let invocation = match command {
                Command::Serve => serve::parse(&mut parser).map(|()| Invocation::Serve),
                Command::Token => token::parse(&mut parser).map(Invocation::Token),
                Command::Listen => listen::parse(&mut parser).map(Invocation::Listen),
                Command::Publish => publish::parse(&mut parser).map(Invocation::Publish),
                Command::HistoryFunction => {
                    history_function::parse(&mut parser).map(|()| Invocation::HistoryFunction)
                }
                Command::Healthcheck => {
                    healthcheck::parse(&mut parser).map(Invocation::Healthcheck)
                }
            };
            match invocation {
                Err(ParseStop::Help) => Ok(Invocation::CommandHelp(command)),
                Err(ParseStop::Usage(message)) => Err(UsageError {
                    command: Some(command),
                    message,
                }),
                Ok(invocation) => Ok(invocation),
            }
        }
    }
}

/// Why a subcommand's parser stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseStop {
    /// `-h` / `--help` was given: print the command's help.
    Help,
    /// A bad argument, with the message to print.
    Usage(String),
}

/// One command-line item as the subcommand parsers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// `--name` or `--name=value` (the value, when inline).
    Option(String, Option<String>),
    /// Anything else, and everything after `--`.
    Positional(String),
}

/// A small hand-written argument lexer: `--name value`, `--name=value`,
/// `-h`, positionals, and `--` to end options (so that a positional such as
/// a JSON payload may start with `-`).
pub struct Parser {
    command: Command,
    args: std::vec::IntoIter<String>,
    only_positionals: bool,
}

impl Parser {
    fn new(command: Command, args: Vec<String>) -> Parser {
        Parser {
            command,
            args: args.into_iter(),
            only_positionals: false,
        }
    }

    /// The next item; `-h`/`--help` stops parsing with [`ParseStop::Help`].
    pub fn next_arg(&mut self) -> Result<Option<Arg>, ParseStop> {
        let Some(arg) = self.args.next() else {
            return Ok(None);
        };
        if self.only_positionals {
            return Ok(Some(Arg::Positional(arg)));
        }
        if arg == "--" {
            self.only_positionals = true;
            return self.next_arg();
        }
        if arg == "-h" || arg == "--help" {
            return Err(ParseStop::Help);
        }
        if let Some(long) = arg.strip_prefix("--") {
            return Ok(Some(match long.split_once('=') {
                Some((name, value)) => Arg::Option(name.to_string(), Some(value.to_string())),
                None => Arg::Option(long.to_string(), None),
            }));
        }
        if arg.len() > 1 && arg.starts_with('-') && !looks_like_number(&arg) {
            return Err(ParseStop::Usage(format!(
                "unknown option {arg:?} for {}",
                self.name()
            )));
        }
        Ok(Some(Arg::Positional(arg)))
    }

    /// The value of option `--name`: inline (`--name=value`) or the next item.
    pub fn value(&mut self, name: &str, inline: Option<String>) -> Result<String, ParseStop> {
        if let Some(value) = inline {
            return Ok(value);
        }
        match self.args.next() {
            Some(value) => Ok(value),
            None => Err(ParseStop::Usage(format!("--{name} needs a value"))),
        }
    }

    /// The error for an option this command does not have.
    pub fn unknown_option(&self, name: &str) -> ParseStop {
        ParseStop::Usage(format!("unknown option --{name} for {}", self.name()))
    }

    /// The error for a positional argument this command does not take.
    pub fn unexpected(&self, arg: &str) -> ParseStop {
        ParseStop::Usage(format!("unexpected argument {arg:?} for {}", self.name()))
    }

    /// For a command that takes no arguments: anything left is an error.
    pub fn no_arguments(&mut self) -> Result<(), ParseStop> {
        match self.next_arg()? {
            None => Ok(()),
            Some(Arg::Option(name, _)) => Err(self.unknown_option(&name)),
            Some(Arg::Positional(arg)) => Err(self.unexpected(&arg)),
        }
    }

    fn name(&self) -> &'static str {
        self.command.name()
    }
}

/// `-1`, `-2.5`: a negative JSON number given as a payload, not an option.
fn looks_like_number(arg: &str) -> bool {
    arg[1..].starts_with(|c: char| c.is_ascii_digit())
}

/// An environment variable, with the empty string counting as unset (as the
/// server's configuration does).
pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Host and port of the local gateway from `WS_HOST`/`WS_PORT`, for the
/// defaults of `listen` and `healthcheck`: a wildcard listen address
/// (`0.0.0.0`, `::`) or none becomes loopback. IPv6 hosts come bracketed.
pub(crate) fn local_gateway() -> Result<(String, u16), String> {
    local_gateway_from(env_var)
}

/// [`local_gateway`] with the environment given as a lookup function.
fn local_gateway_from(env: impl Fn(&str) -> Option<String>) -> Result<(String, u16), String> {
    let port = match env("WS_PORT") {
        None => DEFAULT_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(format!("WS_PORT: {text:?} is not a port (1-65535)")),
        },
    };
    Ok((reachable_host(&env("WS_HOST").unwrap_or_default()), port))
}

/// Where this host's gateway answers `/health`: `WS_ADMIN_ADDR` when set (the
/// main port then answers it 404), else as [`local_gateway`].
pub(crate) fn local_health_endpoint() -> Result<(String, u16), String> {
    local_health_endpoint_from(env_var)
}

/// [`local_health_endpoint`] with the environment given as a lookup function.
fn local_health_endpoint_from(
    env: impl Fn(&str) -> Option<String>,
) -> Result<(String, u16), String> {
    let Some(admin) = env("WS_ADMIN_ADDR") else {
        return local_gateway_from(env);
    };
    let bad = || format!("WS_ADMIN_ADDR: {admin:?} is not host:port");
    let (host, port) = admin.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(port) if port != 0 && !host.is_empty() => Ok((reachable_host(host), port)),
        _ => Err(bad()),
    }
}

/// A listen host as an address to connect to: the wildcard addresses become
/// loopback, an IPv6 address gets its brackets.
fn reachable_host(host: &str) -> String {
    match host.trim_start_matches('[').trim_end_matches(']') {
        "" | "0.0.0.0" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Invocation, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_and_serve_run_the_server() {
        assert_eq!(parse_strs(&[]), Ok(Invocation::Serve));
        assert_eq!(parse_strs(&["serve"]), Ok(Invocation::Serve));
    }

    #[test]
    fn help_and_version() {
        for help in ["-h", "--help", "help"] {
            assert_eq!(parse_strs(&[help]), Ok(Invocation::Help));
        }
        for version in ["-V", "--version"] {
            assert_eq!(parse_strs(&[version]), Ok(Invocation::Version));
        }
        assert_eq!(
            parse_strs(&["help", "publish"]),
            Ok(Invocation::CommandHelp(Command::Publish))
        );
        assert_eq!(
            parse_strs(&["token", "--sub", "a", "--help"]),
            Ok(Invocation::CommandHelp(Command::Token))
        );
        assert_eq!(
            parse_strs(&["serve", "-h"]),
            Ok(Invocation::CommandHelp(Command::Serve))
        );
    }

    #[test]
    fn unknown_commands_and_options_are_usage_errors() {
        let e = parse_strs(&["frobnicate"]).unwrap_err();
        assert_eq!(e.command, None);
        assert!(e.message.contains("unknown command"), "{e}");
        let e = parse_strs(&["--port", "1"]).unwrap_err();
        assert!(e.message.contains("unknown option"), "{e}");
        let e = parse_strs(&["serve", "extra"]).unwrap_err();
        assert_eq!(e.command, Some(Command::Serve));
        let e = parse_strs(&["healthcheck", "-x"]).unwrap_err();
        assert_eq!(e.command, Some(Command::Healthcheck));
        let e = parse_strs(&["help", "nope"]).unwrap_err();
        assert!(e.message.contains("unknown command"), "{e}");
    }

    #[test]
    fn option_values_inline_or_separate() {
        let inline = parse_strs(&["healthcheck", "--url=http://h:1/health"]).unwrap();
        let separate = parse_strs(&["healthcheck", "--url", "http://h:1/health"]).unwrap();
        assert_eq!(inline, separate);
        let e = parse_strs(&["healthcheck", "--url"]).unwrap_err();
        assert!(e.message.contains("--url needs a value"), "{e}");
    }

    #[test]
    fn double_dash_ends_options() {
        let inv = parse_strs(&["publish", "--", "-alice", "t", "-5"]).unwrap();
        let Invocation::Publish(args) = inv else {
            panic!("not publish: {inv:?}")
        };
        assert_eq!(args.user, "-alice");
        assert_eq!(args.payload, "-5");
        // A negative number is a positional even without `--`.
        let inv = parse_strs(&["publish", "alice", "t", "-5"]).unwrap();
        assert!(matches!(inv, Invocation::Publish(a) if a.payload == "-5"));
    }

    #[test]
    fn local_gateway_defaults_to_loopback() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            local_gateway_from(move |name| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(with(&[]), Ok(("127.0.0.1".to_string(), 8081)));
        assert_eq!(
            with(&[("WS_HOST", "0.0.0.0"), ("WS_PORT", "9000")]),
            Ok(("127.0.0.1".to_string(), 9000))
        );
        assert_eq!(with(&[("WS_HOST", "::")]), Ok(("[::1]".to_string(), 8081)));
        assert_eq!(
            with(&[("WS_HOST", "[::1]")]),
            Ok(("[::1]".to_string(), 8081))
        );
        assert_eq!(
            with(&[("WS_HOST", "10.1.2.3")]),
            Ok(("10.1.2.3".to_string(), 8081))
        );
        assert!(with(&[("WS_PORT", "0")]).is_err());
        assert!(with(&[("WS_PORT", "http")]).is_err());
    }

    #[test]
    fn health_is_asked_on_the_admin_address_when_there_is_one() {
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            local_health_endpoint_from(move |name| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(
            with(&[("WS_PORT", "9000")]),
            Ok(("127.0.0.1".to_string(), 9000))
        );
        assert_eq!(
            with(&[("WS_PORT", "9000"), ("WS_ADMIN_ADDR", "0.0.0.0:9090")]),
            Ok(("127.0.0.1".to_string(), 9090))
        );
        assert_eq!(
            with(&[("WS_ADMIN_ADDR", "[::]:9090")]),
            Ok(("[::1]".to_string(), 9090))
        );
        assert_eq!(
            with(&[("WS_ADMIN_ADDR", "10.0.0.5:9090")]),
            Ok(("10.0.0.5".to_string(), 9090))
        );
        assert!(with(&[("WS_ADMIN_ADDR", "9090")]).is_err());
        assert!(with(&[("WS_ADMIN_ADDR", ":9090")]).is_err());
    }

    #[test]
    fn non_utf8_argument_is_a_usage_error() {
        use std::os::unix::ffi::OsStringExt;
        let e = parse([OsString::from_vec(vec![0xff])]).unwrap_err();
        assert!(e.message.contains("not valid UTF-8"), "{e}");
    }
}
