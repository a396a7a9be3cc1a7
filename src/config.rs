//! Environment -> [`Config`]: reading, Go-style duration parsing, `REDIS_URL`
//! parsing and validation. Runs once, on the main thread, before anything else
//! starts; a [`ConfigError`] names the variable and stops the server (exit 2).
//!
//! The variable names and defaults are the Go service's (see the README's
//! configuration table, which also marks our own additions); `template.env`
//! lists every one of them and a test below keeps the two in step.
//! As with Go's `os.Getenv`, a variable set to the empty string counts as unset.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use log::LevelFilter;

/// Everything the server needs to know from its environment, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// `WS_HOST`, default `0.0.0.0`. An IPv6 address is kept without brackets.
    pub host: String,
    /// `WS_PORT`, default 8081.
    pub port: u16,
    /// `WS_ADMIN_ADDR` (`host:port`): when set, `/health` and `/metrics` are
    /// served on a listener of their own there, and answered 404 on `WS_PORT`.
    /// The host is kept without brackets.
    pub admin: Option<(String, u16)>,
    /// `JWT_*`: how tokens are checked.
    pub jwt: JwtConfig,
    /// `REDIS_*` (or `REDIS_URL`): where notifications come from.
    pub redis: RedisConfig,
    /// `WS_PING_INTERVAL`, default 30s: how often the server pings each client.
    pub ping_interval: Duration,
    /// `WS_PONG_WAIT`, default 60s: longer than `ping_interval`.
    pub pong_wait: Duration,
    /// `WS_WRITE_WAIT`, default 10s: how long a client's outbound queue may stall.
    pub write_wait: Duration,
    /// `WS_HANDSHAKE_TIMEOUT`, default 10s: time to send a complete request head.
    pub handshake_timeout: Duration,
    /// `WS_MAX_MESSAGE_SIZE`, default 512: largest client data frame, bytes.
    pub max_message_size: usize,
    /// `WS_MAX_CONNECTIONS`, default 10000.
    pub max_connections: usize,
    /// `WS_MAX_CONNECTIONS_PER_USER`, default [`DEFAULT_MAX_CONNECTIONS_PER_USER`];
    /// 0 = no limit.
    pub max_connections_per_user: usize,
    /// `WS_SEND_BUFFER`, default 256: messages queued per connection.
    pub send_buffer: usize,
    /// `WS_TOKEN_EXPIRY_NOTICE`, default 60s: how long before the token's `exp` a
    /// connection gets `token_expiring`; zero = no notice.
    pub token_expiry_notice: Duration,
    /// `WS_SEND_BUFFER_BYTES`, default 1 MiB: bytes of messages queued per
    /// connection (a larger message still goes out on an empty queue).
    pub send_buffer_bytes: usize,
    /// `WS_HISTORY_SIZE`, default 0 (history off): messages kept per user for
    /// clients that resume (README: "History and resume").
    pub history_size: usize,
    /// `WS_HISTORY_TTL`, default 24h: a user's history expires this long after
    /// its last message.
    pub history_ttl: Duration,
    /// `WS_ALLOWED_ORIGINS`: exact origins; empty = any origin. A request without
    /// `Origin` (not a browser) is always let through; a cookie token needs a
    /// listed one, so `JWT_COOKIE_NAME` requires this list.
    pub allowed_origins: Vec<String>,
    /// `WS_LOOP_NICE`, default 0 (0-19): how much lower than the Redis reader the
    /// event loop runs, so the reader keeps pace with Redis under CPU contention
    /// (0: the same priority; the reader keeps pace without help, PERFORMANCE.md).
    pub loop_nice: i32,
    /// `SHUTDOWN_TIMEOUT`, default 30s: the wait for close replies, counted from
    /// the end of the drain.
    pub shutdown_timeout: Duration,
    /// `SHUTDOWN_DRAIN`, default 0s (every client at once): the window over which
    /// the 1001 closes are spread on shutdown.
    pub shutdown_drain: Duration,
    /// `LOGGER_LEVEL`, default info.
    pub log_level: LevelFilter,
    /// `LOGGER_ENCODING`, default json.
    pub log_encoding: LogEncoding,
}

/// How log lines are written (`LOGGER_ENCODING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEncoding {
    /// One JSON object per line (the default, like Zap's production logger).
    Json,
    /// `time LEVEL target message`, for people reading a terminal.
    Console,
}

/// Token rules (`JWT_*`).
#[derive(Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// `JWT_SECRET_KEY`: HMAC secret. Never printed.
    pub secret: Option<String>,
    /// `JWT_PUBLIC_KEY_FILE`: PEM public key (RSA, EC P-256/P-384 or Ed25519).
    pub public_key_file: Option<PathBuf>,
    /// `JWT_ALGORITHM`: one of [`JWT_ALGORITHMS`]; unset = inferred from the key.
    pub algorithm: Option<Algorithm>,
    /// `JWT_USER_CLAIM`, default `sub`: the string claim holding the user id.
    pub user_claim: String,
    /// `JWT_ISSUER`: required `iss` when set.
    pub issuer: Option<String>,
    /// `JWT_AUDIENCE`: required `aud` when set.
    pub audience: Option<String>,
    /// `JWT_LEEWAY`, default 0s: clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// `JWT_COOKIE_NAME`: cookie that may carry the token (only from an `Origin`
    /// in `WS_ALLOWED_ORIGINS`).
    pub cookie_name: Option<String>,
}

/// The Redis connection, fully resolved: when `REDIS_URL` is set it is parsed
/// into these fields and replaces `REDIS_HOST`, `REDIS_PORT`, `REDIS_USERNAME`,
/// `REDIS_PASSWORD`, `REDIS_DB` and `REDIS_USE_TLS` entirely (those are then
/// not read at all).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `REDIS_HOST`, default `localhost`. An IPv6 address is kept without brackets.
    pub host: String,
    /// `REDIS_PORT`, default 6379.
    pub port: u16,
    /// `REDIS_USERNAME` (ACL user).
    pub username: Option<String>,
    /// `REDIS_PASSWORD`. Never printed.
    pub password: Option<String>,
    /// `REDIS_DB`, default 0.
    pub db: i64,
    /// `REDIS_USE_TLS`, default false (`rediss://` in `REDIS_URL` sets it).
    pub use_tls: bool,
    /// `REDIS_TLS_CA_FILE`: CA bundle for a Redis with a private CA.
    pub tls_ca_file: Option<PathBuf>,
    /// `REDIS_CHANNEL_PREFIX`, default `user_noti:`; subscribed as `<prefix>*`.
    pub channel_prefix: String,
    /// `REDIS_PING_INTERVAL`, default 5s (ours, not the Go service's): how often
    /// the reader pings Redis, and its read timeout for spotting a frozen server.
    pub ping_interval: Duration,
    /// `REDIS_RECONNECT_MAX`, default 2s: the longest delay between reconnect
    /// attempts (the delay doubles from 100 ms up to it, with full jitter).
    pub reconnect_max: Duration,
    /// `REDIS_SUBSCRIBE_MODE`, default `pattern`.
    pub subscribe_mode: SubscribeMode,
    /// `REDIS_CLUSTER_NODES`: the seed nodes of a Redis Cluster, required with
    /// `REDIS_SUBSCRIBE_MODE=sharded` and refused otherwise. Host and port of
    /// each; credentials and TLS are those of the settings above.
    pub cluster_nodes: Vec<(String, u16)>,
    /// `REDIS_UNSUBSCRIBE_LINGER`, default 5s: in `channel` and `sharded` modes,
    /// how long a user's channel stays subscribed after their last connection
    /// left, so that a reconnect (a page reload, a network change) finds it in place.
    pub unsubscribe_linger: Duration,
}

impl RedisConfig {
    /// `REDIS_CLUSTER_NODES` as `host:port,...` (IPv6 hosts in brackets).
    pub fn cluster_nodes_text(&self) -> String {
        self.cluster_nodes
            .iter()
            .map(|(host, port)| host_port_text(host, *port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How the reader subscribes (`REDIS_SUBSCRIBE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeMode {
    /// One `PSUBSCRIBE <prefix>*`: every message for every user.
    Pattern,
    /// One `SUBSCRIBE <prefix><user>` per user connected to this instance.
    Channel,
    /// `SSUBSCRIBE` per user on the Redis Cluster master owning the channel's slot.
    Sharded,
}

impl SubscribeMode {
    /// The variable's value for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscribeMode::Pattern => "pattern",
            SubscribeMode::Channel => "channel",
            SubscribeMode::Sharded => "sharded",
        }
    }

    /// True when subscriptions follow connections (`channel`, `sharded`).
    pub fn per_user(self) -> bool {
        self != SubscribeMode::Pattern
    }
}

/// A variable that could not be used. Displays as `{variable}: {message}`;
/// the message never contains a secret's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The accepted values of `JWT_ALGORITHM` (matched case-insensitively): every
/// algorithm jsonwebtoken verifies. Which ones a key takes is checked by
/// `Authenticator::new`.
pub const JWT_ALGORITHMS: [(&str, Algorithm); 12] = [
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// Default `WS_MAX_CONNECTIONS_PER_USER`: far more than one person's tabs and
/// devices, yet one token can hold at most 1% of the default `WS_MAX_CONNECTIONS`.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 100;

/// Every variable [`Config::from_lookup`] reads.
pub const VARIABLES: &[&str] = &[
    "WS_HOST",
    "WS_PORT",
    "WS_ADMIN_ADDR",
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
    "REDIS_RECONNECT_MAX",
    "REDIS_SUBSCRIBE_MODE",
    "REDIS_CLUSTER_NODES",
    "REDIS_UNSUBSCRIBE_LINGER",
    "WS_PING_INTERVAL",
    "WS_PONG_WAIT",
    "WS_WRITE_WAIT",
    "WS_HANDSHAKE_TIMEOUT",
    "WS_MAX_MESSAGE_SIZE",
    "WS_MAX_CONNECTIONS",
    "WS_MAX_CONNECTIONS_PER_USER",
    "WS_SEND_BUFFER",
    "WS_TOKEN_EXPIRY_NOTICE",
    "WS_SEND_BUFFER_BYTES",
    "WS_HISTORY_SIZE",
    "WS_HISTORY_TTL",
    "WS_ALLOWED_ORIGINS",
    "WS_LOOP_NICE",
    "SHUTDOWN_TIMEOUT",
    "SHUTDOWN_DRAIN",
    "LOGGER_LEVEL",
    "LOGGER_ENCODING",
];

/// Default Redis port, also used when `REDIS_URL` has none.
const DEFAULT_REDIS_PORT: u16 = 6379;

impl Config {
    /// Reads the process environment. A variable that is set but not valid
    /// UTF-8 is an error naming it (rather than silently counting as unset).
    pub fn from_env() -> Result<Config, ConfigError> {
        for &name in VARIABLES {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(name) {
                return Err(ConfigError {
                    variable: name,
                    message: "is not valid UTF-8".to_string(),
                });
            }
        }
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds and validates a configuration from `lookup` (variable name ->
    /// value). The testable core of [`Config::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env { lookup };

        let host = match env.get("WS_HOST") {
            None => "0.0.0.0".to_string(),
            Some(host) => unbracket_host(&host).map_err(|m| error("WS_HOST", m))?,
        };
        let port = env.parse("WS_PORT", 8081, parse_port)?;
        let admin = env.parse("WS_ADMIN_ADDR", None, |text| {
            parse_host_port(text).map(Some)
        })?;

        let jwt = JwtConfig {
            secret: env.get("JWT_SECRET_KEY"),
            public_key_file: env.get("JWT_PUBLIC_KEY_FILE").map(PathBuf::from),
            algorithm: env.parse("JWT_ALGORITHM", None, |text| {
                parse_algorithm(text).map(Some)
            })?,
            user_claim: env
                .get("JWT_USER_CLAIM")
                .unwrap_or_else(|| "sub".to_string()),
            issuer: env.get("JWT_ISSUER"),
            audience: env.get("JWT_AUDIENCE"),
            leeway: env.parse("JWT_LEEWAY", Duration::ZERO, parse_duration)?,
            cookie_name: env.get("JWT_COOKIE_NAME"),
        };
        if jwt.secret.is_none() && jwt.public_key_file.is_none() {
            return Err(error(
                "JWT_SECRET_KEY",
                "is required (or set JWT_PUBLIC_KEY_FILE)",
            ));
        }

        let allowed_origins = env
            .get("WS_ALLOWED_ORIGINS")
            .map(|list| parse_origins(&list))
            .unwrap_or_default();
        // A browser attaches cookies to a WebSocket opened by any page (cross-site
        // WebSocket hijacking); only an origin list tells the gateway's own pages
        // from the others.
        if jwt.cookie_name.is_some() && allowed_origins.is_empty() {
            return Err(error(
                "JWT_COOKIE_NAME",
                "requires WS_ALLOWED_ORIGINS: a cookie token is only accepted from a listed \
                 Origin, or any web page could open a socket with the user's cookie",
            ));
        }

        let redis = redis_config(&env)?;
        if redis.use_tls
            && let Some(path) = &redis.tls_ca_file
        {
            check_ca_file(path).map_err(|m| error("REDIS_TLS_CA_FILE", m))?;
        }

        let ping_interval = env.parse("WS_PING_INTERVAL", secs(30), parse_interval)?;
        let pong_wait = env.parse("WS_PONG_WAIT", secs(60), parse_interval)?;
        if pong_wait <= ping_interval {
            return Err(error(
                "WS_PING_INTERVAL",
                format!(
                    "must be shorter than WS_PONG_WAIT ({ping_interval:?} is not less than {pong_wait:?})"
                ),
            ));
        }

        Ok(Config {
            host,
            port,
            admin,
            jwt,
            redis,
            ping_interval,
            pong_wait,
            write_wait: env.parse("WS_WRITE_WAIT", secs(10), parse_interval)?,
            handshake_timeout: env.parse("WS_HANDSHAKE_TIMEOUT", secs(10), parse_interval)?,
            max_message_size: env.parse("WS_MAX_MESSAGE_SIZE", 512, parse_count)?,
            max_connections: env.parse("WS_MAX_CONNECTIONS", 10_000, parse_count)?,
            max_connections_per_user: env.parse(
                "WS_MAX_CONNECTIONS_PER_USER",
                DEFAULT_MAX_CONNECTIONS_PER_USER,
                parse_count_or_zero,
            )?,
            send_buffer: env.parse("WS_SEND_BUFFER", 256, parse_count)?,
            token_expiry_notice: env.parse("WS_TOKEN_EXPIRY_NOTICE", secs(60), parse_duration)?,
            send_buffer_bytes: env.parse("WS_SEND_BUFFER_BYTES", 1 << 20, parse_byte_size)?,
            history_size: env.parse("WS_HISTORY_SIZE", 0, parse_history_size)?,
            history_ttl: env.parse("WS_HISTORY_TTL", secs(24 * 3600), parse_interval)?,
            allowed_origins,
            loop_nice: env.parse("WS_LOOP_NICE", 0, parse_nice)?,
            shutdown_timeout: env.parse("SHUTDOWN_TIMEOUT", secs(30), parse_interval)?,
            shutdown_drain: env.parse("SHUTDOWN_DRAIN", Duration::ZERO, parse_duration)?,
            log_level: env.parse("LOGGER_LEVEL", LevelFilter::Info, parse_log_level)?,
            log_encoding: env.parse("LOGGER_ENCODING", LogEncoding::Json, parse_log_encoding)?,
        })
    }

    /// The listen address as `host:port`, an IPv6 host in brackets
    /// (`[::1]:8081`), ready for `str::parse::<SocketAddr>` or a log line.
    pub fn listen_addr_text(&self) -> String {
        host_port_text(&self.host, self.port)
    }

    /// `WS_ADMIN_ADDR` as `host:port` (IPv6 in brackets), when set.
    pub fn admin_addr_text(&self) -> Option<String> {
        self.admin
            .as_ref()
            .map(|(host, port)| host_port_text(host, *port))
    }
}

/// `host:port`, bracketing an IPv6 host.
fn host_port_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn redis_config<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<RedisConfig, ConfigError> {
    let connection = match env.get("REDIS_URL") {
        Some(url) => parse_redis_url(&url).map_err(|m| error("REDIS_URL", m))?,
        None => RedisUrl {
            host: match env.get("REDIS_HOST") {
                None => "localhost".to_string(),
                Some(host) => unbracket_host(&host).map_err(|m| error("REDIS_HOST", m))?,
            },
            port: env.parse("REDIS_PORT", DEFAULT_REDIS_PORT, parse_port)?,
            username: env.get("REDIS_USERNAME"),
            password: env.get("REDIS_PASSWORD"),
            db: env.parse("REDIS_DB", 0, parse_db)?,
            use_tls: env.parse("REDIS_USE_TLS", false, parse_bool)?,
        },
    };
    let subscribe_mode = env.parse(
        "REDIS_SUBSCRIBE_MODE",
        SubscribeMode::Pattern,
        parse_subscribe_mode,
    )?;
    let cluster_nodes = match (subscribe_mode, env.get("REDIS_CLUSTER_NODES")) {
        (SubscribeMode::Sharded, Some(text)) => {
            parse_cluster_nodes(&text).map_err(|m| error("REDIS_CLUSTER_NODES", m))?
        }
        (SubscribeMode::Sharded, None) => {
            return Err(error(
                "REDIS_CLUSTER_NODES",
                "is required with REDIS_SUBSCRIBE_MODE=sharded (host:port,host:port,... of the cluster's nodes)",
            ));
        }
        (_, Some(_)) => {
            return Err(error(
                "REDIS_CLUSTER_NODES",
                "is only used with REDIS_SUBSCRIBE_MODE=sharded",
            ));
        }
        (_, None) => Vec::new(),
    };
    if subscribe_mode == SubscribeMode::Sharded && connection.db != 0 {
        return Err(error(
            "REDIS_DB",
            format!(
                "is {} (or the database of REDIS_URL): a Redis Cluster has only database 0 (REDIS_SUBSCRIBE_MODE=sharded)",
                connection.db
            ),
        ));
    }
    let channel_prefix = env
        .get("REDIS_CHANNEL_PREFIX")
        .unwrap_or_else(|| "user_noti:".to_string());
    // The reader subscribes with PSUBSCRIBE "<prefix>*": a glob character in the
    // prefix would silently widen or break that pattern.
    if channel_prefix
        .chars()
        .any(|c| matches!(c, '*' | '?' | '[' | ']' | '\\'))
    {
        return Err(error(
            "REDIS_CHANNEL_PREFIX",
            format!(
                "{channel_prefix:?} must not contain * ? [ ] or \\ (it is subscribed as a glob pattern <prefix>*)"
            ),
        ));
    }
    Ok(RedisConfig {
        host: connection.host,
        port: connection.port,
        username: connection.username,
        password: connection.password,
        db: connection.db,
        use_tls: connection.use_tls,
        tls_ca_file: env.get("REDIS_TLS_CA_FILE").map(PathBuf::from),
        channel_prefix,
        ping_interval: env.parse("REDIS_PING_INTERVAL", secs(5), parse_interval)?,
        reconnect_max: env.parse("REDIS_RECONNECT_MAX", secs(2), parse_interval)?,
        subscribe_mode,
        cluster_nodes,
        unsubscribe_linger: env.parse("REDIS_UNSUBSCRIBE_LINGER", secs(5), parse_duration)?,
    })
}

fn parse_subscribe_mode(text: &str) -> Result<SubscribeMode, String> {
    match text.to_ascii_lowercase().as_str() {
        "pattern" => Ok(SubscribeMode::Pattern),
        "channel" => Ok(SubscribeMode::Channel),
        "sharded" => Ok(SubscribeMode::Sharded),
        _ => Err(format!(
            "{text:?} is not a subscribe mode (pattern, channel or sharded)"
        )),
    }
}

/// `host:port,host:port,...` (an IPv6 host in brackets); at least one node.
fn parse_cluster_nodes(text: &str) -> Result<Vec<(String, u16)>, String> {
    let mut nodes = Vec::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (host, port) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("{item:?} is not host:port"))?;
        if host.is_empty() {
            return Err(format!("{item:?} has no host"));
        }
        let host = unbracket_host(host)?;
        nodes.push((host, parse_port(port)?));
    }
    if nodes.is_empty() {
        return Err(format!("{text:?} names no node (host:port,host:port,...)"));
    }
    Ok(nodes)
}

/// The lookup function, with Go's "empty means unset" rule applied.
struct Env<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.is_empty())
    }

    /// `default` when unset, else `parse(value)` with its error tagged by `name`.
    fn parse<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => parse(&text).map_err(|message| error(name, message)),
        }
    }
}

fn error(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        message: message.into(),
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port number (1-65535)")),
    }
}

/// `host:port` with a port (`127.0.0.1:9090`, `[::1]:9090`, `admin.local:9090`);
/// the host comes back without brackets.
fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is not host:port"));
    };
    if host.is_empty() {
        return Err(format!(
            "{text:?} has no host (0.0.0.0 listens on every interface)"
        ));
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(format!(
            "{text:?}: an IPv6 address needs brackets ([::1]:9090)"
        ));
    }
    Ok((unbracket_host(host)?, parse_port(port)?))
}

/// A count that must be at least 1.
fn parse_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err(format!("{text:?} must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number (1 or more)")),
    }
}

/// A size in bytes, at least 1: a plain number or one with a `KiB`, `MiB` or
/// `GiB` suffix (`65536`, `512KiB`, `1MiB`).
fn parse_byte_size(text: &str) -> Result<usize, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: usize = match &text[digits.len()..] {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 0,
    };
    match digits.parse::<usize>().map(|n| n.checked_mul(unit)) {
        Ok(Some(bytes)) if bytes > 0 => Ok(bytes),
        _ => Err(format!(
            "{text:?} is not a size in bytes (at least 1; a number, or with KiB, MiB or GiB: 1MiB)"
        )),
    }
}

/// A count where 0 means "no limit".
fn parse_count_or_zero(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .map_err(|_| format!("{text:?} is not a whole number (0 = no limit)"))
}

/// Most messages kept per user: a resume replays up to this many, in one read.
const MAX_HISTORY_SIZE: usize = 100_000;

/// `WS_HISTORY_SIZE`: 0 (off) up to `MAX_HISTORY_SIZE`.
fn parse_history_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n <= MAX_HISTORY_SIZE => Ok(n),
        _ => Err(format!(
            "{text:?} is not a whole number from 0 (history off) to {MAX_HISTORY_SIZE}"
        )),
    }
}

/// A nice increment: 0 (none) to 19 (the lowest priority there is).
fn parse_nice(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(n) if (0..=19).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a whole number from 0 to 19")),
    }
}

fn parse_db(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(db) if db >= 0 => Ok(db),
        _ => Err(format!("{text:?} is not a database number (0 or more)")),
    }
}

/// A duration that must be greater than zero.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be greater than 0"));
    }
    Ok(duration)
}

/// Go's `strconv.ParseBool` spellings.
fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean (true or false)")),
    }
}

/// `JWT_ALGORITHM`: one of [`JWT_ALGORITHMS`], case-insensitive.
fn parse_algorithm(text: &str) -> Result<Algorithm, String> {
    JWT_ALGORITHMS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
        .map(|&(_, algorithm)| algorithm)
        .ok_or_else(|| {
            let names: Vec<&str> = JWT_ALGORITHMS.iter().map(|(name, _)| *name).collect();
            format!(
                "{text:?} is not a supported algorithm (one of {})",
                names.join(", ")
            )
        })
}

/// `REDIS_TLS_CA_FILE` must be readable and hold at least one PEM certificate,
/// or every TLS connection to Redis would fail long after start.
fn check_ca_file(path: &std::path::Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let has_certificate = pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----");
    if has_certificate {
        Ok(())
    } else {
        Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))
    }
}

/// Zap's level names, case-insensitive; Zap's dpanic/panic/fatal log as errors.
fn parse_log_level(text: &str) -> Result<LevelFilter, String> {
    match text.to_ascii_lowercase().as_str() {
        "debug" => Ok(LevelFilter::Debug),
        "info" => Ok(LevelFilter::Info),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "error" | "dpanic" | "panic" | "fatal" => Ok(LevelFilter::Error),
        _ => Err(format!(
            "{text:?} is not a log level (debug, info, warn, error)"
        )),
    }
}

fn parse_log_encoding(text: &str) -> Result<LogEncoding, String> {
    match text.to_ascii_lowercase().as_str() {
        "json" => Ok(LogEncoding::Json),
        "console" => Ok(LogEncoding::Console),
        _ => Err(format!("{text:?} is not a log encoding (json or console)")),
    }
}

/// Comma-separated origins, each trimmed, empty entries dropped.
fn parse_origins(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(str::to_string)
        .collect()
}

/// A host name or address as given in `WS_HOST` / `REDIS_HOST`; a bracketed
/// IPv6 literal (`[::1]`) loses its brackets so every host is stored the same way.
fn unbracket_host(text: &str) -> Result<String, String> {
    if let Some(inner) = text.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(format!("{text:?} has an unclosed ["));
        };
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{text:?} is not an IPv6 address"));
        }
        return Ok(inner.to_string());
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{text:?} contains whitespace"));
    }
    Ok(text.to_string())
}

/// The connection part of a `REDIS_URL`.
struct RedisUrl {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    use_tls: bool,
}

/// Parses `redis://[[user]:password@]host[:port][/db]` (or `rediss://`, which
/// turns TLS on). User and password are percent-decoded; the host may be an
/// IPv6 literal in brackets; a `?query` or `#fragment` is ignored. An empty
/// host means `localhost`, as in go-redis. Error messages say what is wrong and
/// never repeat any part of the URL: in a malformed URL a password can stand
/// anywhere (`redis://:S3cret` reads as host "" and port "S3cret").
fn parse_redis_url(url: &str) -> Result<RedisUrl, String> {
    let bad_scheme = || "must start with redis:// or rediss://".to_string();
    let (scheme, rest) = url.split_once("://").ok_or_else(bad_scheme)?;
    let use_tls = if scheme.eq_ignore_ascii_case("redis") {
        false
    } else if scheme.eq_ignore_ascii_case("rediss") {
        true
    } else {
        return Err(bad_scheme());
    };

    // The user info ends at the last '@', so an unescaped '@', '/', '?' or
    // '#' in a password still parses (leniently, like Python's urlsplit).
    let (user_info, rest) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (username, password) = match user_info {
        None => (None, None),
        Some(info) => {
            let (user, password) = match info.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (info, None),
            };
            (
                decode_user_info(user, "user name")?,
                match password {
                    Some(password) => decode_user_info(password, "password")?,
                    None => None,
                },
            )
        }
    };

    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash + 1..]),
        None => (rest, ""),
    };

    let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return Err("the IPv6 host has no closing ]".to_string());
        };
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err("the bracketed host is not an IPv6 address".to_string());
        }
        let port_text = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("unexpected text after the IPv6 host".to_string()),
            },
        };
        (inner.to_string(), port_text)
    } else {
        let (host, port_text) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if port_text.is_some_and(|port| port.contains(':')) {
            return Err("an IPv6 host must be in brackets, e.g. redis://[::1]:6379".to_string());
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '[' || c == ']')
        {
            return Err("the host contains whitespace, a control character or [ ]".to_string());
        }
        let host = if host.is_empty() { "localhost" } else { host };
        (host.to_string(), port_text)
    };

    let port = match port_text {
        None => DEFAULT_REDIS_PORT,
        Some(text) => parse_port(text).map_err(|_| {
            "the port is not a number from 1 to 65535 (a password needs @host after it)".to_string()
        })?,
    };
    let db = match path {
        "" => 0,
        text => parse_db(text)
            .map_err(|_| "the path is not a database number (/0, /1, ...)".to_string())?,
    };
    Ok(RedisUrl {
        host,
        port,
        username,
        password,
        db,
        use_tls,
    })
}

/// Percent-decodes one part of the user info; empty means absent.
fn decode_user_info(text: &str, what: &str) -> Result<Option<String>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let bytes = crate::http::percent_decode(text.as_bytes(), false).into_owned();
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("the {what} is not valid UTF-8 after percent-decoding"))
}

/// The largest duration Go's `time.Duration` can hold (i64 nanoseconds, about
/// 292 years); longer values are rejected as overflow, as Go does.
const MAX_DURATION_NANOS: u128 = i64::MAX as u128;

/// Parses a duration the way Go's `time.ParseDuration` does: a sequence of
/// decimal numbers, each with an optional fraction and a unit (`ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h`), such as `500ms`, `1m30s`, `1.5h`, `2h45m`,
/// with an optional leading `+`. `0` needs no unit. Unlike Go, negative
/// durations are rejected, and so are durations longer than Go can hold.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("{text:?} is not a duration ({why}; e.g. 500ms, 30s, 1m30s)");
    let mut rest = match text.strip_prefix('+') {
        Some(rest) => rest,
        None if text.starts_with('-') => return Err(invalid("negative")),
        None => text,
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid("empty"));
    }

    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int_digits = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_digits = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_digits = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(invalid("expected a number"));
        }

        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(invalid("missing unit")),
            _ => return Err(invalid(&format!("unknown unit {unit:?}"))),
        };

        let overflow = || invalid("too large");
        let mut whole: u128 = 0;
        for digit in int_digits.bytes() {
            whole = whole * 10 + u128::from(digit - b'0');
            if whole > MAX_DURATION_NANOS {
                return Err(overflow());
            }
        }
        // 20 fractional digits are far finer than a nanosecond of an hour; any
        // further digits are ignored (Go stops reading them too). The fraction
        // is rounded to the nearest nanosecond, so "0.3333333333333333333h" is
        // 20m, as in Go.
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        for digit in frac_digits.bytes().take(20) {
            frac = frac * 10 + u128::from(digit - b'0');
            scale *= 10;
        }
        // whole <= i64::MAX and unit_nanos <= 3.6e12, so nothing here
        // overflows a u128.
        total += whole * unit_nanos + (frac * unit_nanos + scale / 2) / scale;
        if total > MAX_DURATION_NANOS {
            return Err(overflow());
        }
    }
    // total <= i64::MAX, so it fits in a u64.
    Ok(Duration::from_nanos(total as u64))
}

/// `Some(<redacted>)` / `None`: shows whether a secret is set, never its value.
struct Redacted<'a>(&'a Option<String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("<redacted>"),
            None => f.write_str("None"),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("admin", &self.admin)
            .field("jwt", &self.jwt)
            .field("redis", &self.redis)
            .field("ping_interval", &self.ping_interval)
            .field("pong_wait", &self.pong_wait)
            .field("write_wait", &self.write_wait)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("send_buffer", &self.send_buffer)
            .field("token_expiry_notice", &self.token_expiry_notice)
            .field("send_buffer_bytes", &self.send_buffer_bytes)
            .field("history_size", &self.history_size)
            .field("history_ttl", &self.history_ttl)
            .field("allowed_origins", &self.allowed_origins)
            .field("loop_nice", &self.loop_nice)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("shutdown_drain", &self.shutdown_drain)
            .field("log_level", &self.log_level)
            .field("log_encoding", &self.log_encoding)
            .finish()
    }
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &Redacted(&self.secret))
            .field("public_key_file", &self.public_key_file)
            .field("algorithm", &self.algorithm)
            .field("user_claim", &self.user_claim)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("cookie_name", &self.cookie_name)
            .finish()
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &Redacted(&self.password))
            .field("db", &self.db)
            .field("use_tls", &self.use_tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("channel_prefix", &self.channel_prefix)
            .field("ping_interval", &self.ping_interval)
            .field("reconnect_max", &self.reconnect_max)
            .field("subscribe_mode", &self.subscribe_mode)
            .field("cluster_nodes", &self.cluster_nodes)
            .field("unsubscribe_linger", &self.unsubscribe_linger)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A config from `pairs`, with a JWT secret unless the pairs set one.
    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("JWT_SECRET_KEY".into(), "test-secret".into());
        for (key, value) in pairs {
            vars.insert((*key).into(), (*value).into());
        }
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    fn error_for(pairs: &[(&str, &str)]) -> ConfigError {
        match config(pairs) {
            Ok(config) => panic!("expected an error for {pairs:?}, got {config:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn admin_addr_is_a_host_and_a_port() {
        assert_eq!(config(&[]).unwrap().admin_addr_text(), None);
        let admin = config(&[("WS_ADMIN_ADDR", "127.0.0.1:9090")]).unwrap();
        assert_eq!(admin.admin_addr_text().as_deref(), Some("127.0.0.1:9090"));
        let admin = config(&[("WS_ADMIN_ADDR", "[::1]:9090")]).unwrap();
        assert_eq!(admin.admin, Some(("::1".to_string(), 9090)));
        assert_eq!(admin.admin_addr_text().as_deref(), Some("[::1]:9090"));
        for bad in [
            "9090",
            ":9090",
            "::1:9090",
            "[::1:9090",
            "host:0",
            "host:http",
            "my host:9090",
        ] {
            let e = error_for(&[("WS_ADMIN_ADDR", bad)]);
            assert_eq!(e.variable, "WS_ADMIN_ADDR", "{bad}: {e}");
        }
    }

    /// A test-only self-signed certificate.
    const CA_FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test-only-ca-cert.pem"
    );

    fn redis_url(url: &str) -> RedisConfig {
        match config(&[("REDIS_URL", url)]) {
            Ok(config) => config.redis,
            Err(error) => panic!("{url}: {error}"),
        }
    }

    fn redis_url_error(url: &str) -> ConfigError {
        let error = error_for(&[("REDIS_URL", url)]);
        assert_eq!(error.variable, "REDIS_URL", "{url}: {error}");
        error
    }

    #[test]
    fn defaults() {
        let config = config(&[]).unwrap();
        assert_eq!(config.host, "0.0.0.0");
        assert_eq!(config.port, 8081);
        assert_eq!(config.listen_addr_text(), "0.0.0.0:8081");
        assert_eq!(config.jwt.secret.as_deref(), Some("test-secret"));
        assert_eq!(config.jwt.public_key_file, None);
        assert_eq!(config.jwt.algorithm, None);
        assert_eq!(config.jwt.user_claim, "sub");
        assert_eq!(config.jwt.issuer, None);
        assert_eq!(config.jwt.audience, None);
        assert_eq!(config.jwt.leeway, Duration::ZERO);
        assert_eq!(config.jwt.cookie_name, None);
        assert_eq!(config.redis.host, "localhost");
        assert_eq!(config.redis.port, 6379);
        assert_eq!(config.redis.username, None);
        assert_eq!(config.redis.password, None);
        assert_eq!(config.redis.db, 0);
        assert!(!config.redis.use_tls);
        assert_eq!(config.redis.tls_ca_file, None);
        assert_eq!(config.redis.channel_prefix, "user_noti:");
        assert_eq!(config.redis.ping_interval, secs(5));
        assert_eq!(config.redis.reconnect_max, secs(2));
        assert_eq!(config.ping_interval, secs(30));
        assert_eq!(config.pong_wait, secs(60));
        assert_eq!(config.write_wait, secs(10));
        assert_eq!(config.handshake_timeout, secs(10));
        assert_eq!(config.max_message_size, 512);
        assert_eq!(config.max_connections, 10_000);
        assert_eq!(config.max_connections_per_user, 100);
        assert_eq!(config.send_buffer, 256);
        assert_eq!(config.token_expiry_notice, secs(60));
        assert_eq!(config.send_buffer_bytes, 1 << 20);
        assert_eq!(config.history_size, 0);
        assert_eq!(config.history_ttl, secs(24 * 3600));
        assert_eq!(config.loop_nice, 0);
        assert!(config.allowed_origins.is_empty());
        assert_eq!(config.shutdown_timeout, secs(30));
        assert_eq!(config.shutdown_drain, Duration::ZERO);
        assert_eq!(config.log_level, LevelFilter::Info);
        assert_eq!(config.log_encoding, LogEncoding::Json);
    }

    #[test]
    fn every_variable_set() {
        let config = config(&[
            ("WS_HOST", "127.0.0.1"),
            ("WS_PORT", "9000"),
            ("JWT_SECRET_KEY", "s3cret"),
            ("JWT_PUBLIC_KEY_FILE", "/etc/ws/key.pem"),
            ("JWT_ALGORITHM", "ES256"),
            ("JWT_USER_CLAIM", "uid"),
            ("JWT_ISSUER", "auth.example.com"),
            ("JWT_AUDIENCE", "notify"),
            ("JWT_LEEWAY", "5s"),
            ("JWT_COOKIE_NAME", "session"),
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PORT", "6380"),
            ("REDIS_USERNAME", "notify"),
            ("REDIS_PASSWORD", "pw"),
            ("REDIS_DB", "3"),
            ("REDIS_USE_TLS", "TRUE"),
            ("REDIS_TLS_CA_FILE", CA_FIXTURE),
            ("REDIS_CHANNEL_PREFIX", "notify:"),
            ("REDIS_PING_INTERVAL", "2s"),
            ("REDIS_RECONNECT_MAX", "750ms"),
            ("REDIS_SUBSCRIBE_MODE", "Channel"),
            ("REDIS_UNSUBSCRIBE_LINGER", "3s"),
            ("WS_PING_INTERVAL", "15s"),
            ("WS_PONG_WAIT", "20s"),
            ("WS_WRITE_WAIT", "1s"),
            ("WS_HANDSHAKE_TIMEOUT", "3s"),
            ("WS_MAX_MESSAGE_SIZE", "4096"),
            ("WS_MAX_CONNECTIONS", "50"),
            ("WS_MAX_CONNECTIONS_PER_USER", "5"),
            ("WS_SEND_BUFFER", "8"),
            ("WS_TOKEN_EXPIRY_NOTICE", "0"),
            ("WS_SEND_BUFFER_BYTES", "512KiB"),
            (
                "WS_ALLOWED_ORIGINS",
                " https://a.example.com ,, https://b.example.com,",
            ),
            ("WS_LOOP_NICE", "5"),
            ("SHUTDOWN_TIMEOUT", "1m"),
            ("LOGGER_LEVEL", "WARNING"),
            ("LOGGER_ENCODING", "console"),
        ])
        .unwrap();
        assert_eq!(config.listen_addr_text(), "127.0.0.1:9000");
        assert_eq!(config.jwt.secret.as_deref(), Some("s3cret"));
        assert_eq!(
            config.jwt.public_key_file,
            Some(PathBuf::from("/etc/ws/key.pem"))
        );
        assert_eq!(config.jwt.algorithm, Some(Algorithm::ES256));
        assert_eq!(config.jwt.user_claim, "uid");
        assert_eq!(config.jwt.issuer.as_deref(), Some("auth.example.com"));
        assert_eq!(config.jwt.audience.as_deref(), Some("notify"));
        assert_eq!(config.jwt.leeway, secs(5));
        assert_eq!(config.jwt.cookie_name.as_deref(), Some("session"));
        assert_eq!(
            config.redis,
            RedisConfig {
                host: "redis.internal".into(),
                port: 6380,
                username: Some("notify".into()),
                password: Some("pw".into()),
                db: 3,
                use_tls: true,
                tls_ca_file: Some(PathBuf::from(CA_FIXTURE)),
                channel_prefix: "notify:".into(),
                ping_interval: secs(2),
                reconnect_max: Duration::from_millis(750),
                subscribe_mode: SubscribeMode::Channel,
                cluster_nodes: Vec::new(),
                unsubscribe_linger: secs(3),
            }
        );
        assert_eq!(config.ping_interval, secs(15));
        assert_eq!(config.pong_wait, secs(20));
        assert_eq!(config.write_wait, secs(1));
        assert_eq!(config.handshake_timeout, secs(3));
        assert_eq!(config.max_message_size, 4096);
        assert_eq!(config.max_connections, 50);
        assert_eq!(config.max_connections_per_user, 5);
        assert_eq!(config.send_buffer, 8);
        assert_eq!(config.token_expiry_notice, Duration::ZERO);
        assert_eq!(config.send_buffer_bytes, 512 << 10);
        assert_eq!(config.loop_nice, 5);
        assert_eq!(
            config.allowed_origins,
            vec!["https://a.example.com", "https://b.example.com"]
        );
        assert_eq!(config.shutdown_timeout, secs(60));
        assert_eq!(config.log_level, LevelFilter::Warn);
        assert_eq!(config.log_encoding, LogEncoding::Console);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let empty: Vec<(&str, &str)> = VARIABLES
            .iter()
            .filter(|&&name| name != "JWT_SECRET_KEY")
            .map(|&name| (name, ""))
            .collect();
        assert_eq!(config(&empty).unwrap(), config(&[]).unwrap());
    }

    #[test]
    fn jwt_secret_required_unless_public_key() {
        let error = Config::from_lookup(|_| None).unwrap_err();
        assert_eq!(
            error,
            ConfigError {
                variable: "JWT_SECRET_KEY",
                message: "is required (or set JWT_PUBLIC_KEY_FILE)".into(),
            }
        );
        assert_eq!(
            error.to_string(),
            "JWT_SECRET_KEY: is required (or set JWT_PUBLIC_KEY_FILE)"
        );
        let error = error_for(&[("JWT_SECRET_KEY", "")]);
        assert_eq!(error.variable, "JWT_SECRET_KEY");

        let config = Config::from_lookup(|name| match name {
            "JWT_PUBLIC_KEY_FILE" => Some("/keys/jwt.pem".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.jwt.secret, None);
        assert_eq!(
            config.jwt.public_key_file,
            Some(PathBuf::from("/keys/jwt.pem"))
        );
    }

    #[test]
    fn subscribe_modes_and_cluster_nodes() {
        let sharded = config(&[
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            (
                "REDIS_CLUSTER_NODES",
                "10.0.0.1:7000, [::1]:7001,redis-2:7002",
            ),
        ])
        .unwrap();
        assert_eq!(sharded.redis.subscribe_mode, SubscribeMode::Sharded);
        assert_eq!(
            sharded.redis.cluster_nodes,
            vec![
                ("10.0.0.1".to_string(), 7000),
                ("::1".to_string(), 7001),
                ("redis-2".to_string(), 7002)
            ]
        );
        assert_eq!(sharded.redis.unsubscribe_linger, secs(5));
        let default = config(&[]).unwrap();
        assert_eq!(default.redis.subscribe_mode, SubscribeMode::Pattern);
        assert!(default.redis.cluster_nodes.is_empty());

        let missing = error_for(&[("REDIS_SUBSCRIBE_MODE", "sharded")]);
        assert_eq!(missing.variable, "REDIS_CLUSTER_NODES");
        let db = error_for(&[
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            ("REDIS_CLUSTER_NODES", "10.0.0.1:7000"),
            ("REDIS_DB", "2"),
        ]);
        assert_eq!(db.variable, "REDIS_DB");
        assert!(missing.message.contains("required"), "{missing}");
        let stray = error_for(&[("REDIS_CLUSTER_NODES", "127.0.0.1:7000")]);
        assert_eq!(stray.variable, "REDIS_CLUSTER_NODES");
        assert!(stray.message.contains("only used"), "{stray}");
        for bad in ["7000", ":7000", "host:0", "host:x", " , "] {
            let error = error_for(&[
                ("REDIS_SUBSCRIBE_MODE", "sharded"),
                ("REDIS_CLUSTER_NODES", bad),
            ]);
            assert_eq!(error.variable, "REDIS_CLUSTER_NODES", "{bad:?}");
        }
        let linger = config(&[("REDIS_UNSUBSCRIBE_LINGER", "0s")]).unwrap();
        assert_eq!(linger.redis.unsubscribe_linger, Duration::ZERO);
    }

    #[test]
    fn port_error_message() {
        let error = error_for(&[("WS_PORT", "80x")]);
        assert_eq!(
            error.to_string(),
            r#"WS_PORT: "80x" is not a port number (1-65535)"#
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str)] = &[
            ("WS_HOST", "[::1"),
            ("WS_HOST", "[not-v6]"),
            ("WS_HOST", "my host"),
            ("WS_PORT", "0"),
            ("WS_PORT", "65536"),
            ("WS_PORT", "-1"),
            ("WS_PORT", " 8081"),
            ("JWT_ALGORITHM", "none"),
            ("JWT_ALGORITHM", "HS1"),
            ("JWT_ALGORITHM", "ES512"),
            ("JWT_COOKIE_NAME", "session"),
            ("JWT_LEEWAY", "-1s"),
            ("JWT_LEEWAY", "5"),
            ("REDIS_HOST", "[::1"),
            ("REDIS_PORT", "0"),
            ("REDIS_PORT", "redis"),
            ("REDIS_DB", "-1"),
            ("REDIS_DB", "one"),
            ("REDIS_USE_TLS", "yes"),
            ("REDIS_USE_TLS", "tRUE"),
            ("REDIS_CHANNEL_PREFIX", "user_noti:*"),
            ("REDIS_CHANNEL_PREFIX", "a[b]:"),
            ("REDIS_PING_INTERVAL", "0s"),
            ("REDIS_PING_INTERVAL", "5"),
            ("REDIS_RECONNECT_MAX", "0s"),
            ("REDIS_SUBSCRIBE_MODE", "psubscribe"),
            ("REDIS_UNSUBSCRIBE_LINGER", "5"),
            ("REDIS_RECONNECT_MAX", "2"),
            ("WS_PONG_WAIT", "0"),
            ("WS_PONG_WAIT", "1 m"),
            ("WS_WRITE_WAIT", "0ms"),
            ("WS_WRITE_WAIT", "ten seconds"),
            ("WS_HANDSHAKE_TIMEOUT", "-10s"),
            ("WS_MAX_MESSAGE_SIZE", "0"),
            ("WS_MAX_MESSAGE_SIZE", "1k"),
            ("WS_MAX_CONNECTIONS", "0"),
            ("WS_MAX_CONNECTIONS", "-5"),
            ("WS_MAX_CONNECTIONS_PER_USER", "-1"),
            ("WS_MAX_CONNECTIONS_PER_USER", "unlimited"),
            ("WS_SEND_BUFFER", "0"),
            ("WS_SEND_BUFFER", "1.5"),
            ("WS_TOKEN_EXPIRY_NOTICE", "60"),
            ("WS_TOKEN_EXPIRY_NOTICE", "-1s"),
            ("WS_SEND_BUFFER_BYTES", "0"),
            ("WS_SEND_BUFFER_BYTES", "1MB"),
            ("WS_SEND_BUFFER_BYTES", "MiB"),
            ("WS_SEND_BUFFER_BYTES", "-1"),
            ("WS_SEND_BUFFER_BYTES", "99999999999GiB"),
            ("WS_HISTORY_SIZE", "-1"),
            ("WS_HISTORY_SIZE", "100001"),
            ("WS_HISTORY_TTL", "0s"),
            ("WS_LOOP_NICE", "-1"),
            ("WS_LOOP_NICE", "20"),
            ("WS_LOOP_NICE", "low"),
            ("SHUTDOWN_TIMEOUT", "0s"),
            ("SHUTDOWN_TIMEOUT", "30"),
            ("SHUTDOWN_DRAIN", "30"),
            ("SHUTDOWN_DRAIN", "soon"),
            ("LOGGER_LEVEL", "trace"),
            ("LOGGER_LEVEL", "verbose"),
            ("LOGGER_ENCODING", "text"),
        ];
        for &(variable, value) in cases {
            let error = error_for(&[(variable, value)]);
            assert_eq!(error.variable, variable, "{variable}={value:?}: {error}");
            assert!(
                error.to_string().starts_with(&format!("{variable}: ")),
                "{error}"
            );
        }
        // WS_PING_INTERVAL itself: not a duration, zero, or not below the pong wait.
        for value in ["abc", "0", "60s", "2m"] {
            let error = error_for(&[("WS_PING_INTERVAL", value)]);
            assert_eq!(error.variable, "WS_PING_INTERVAL", "{value}: {error}");
        }
        let error = error_for(&[("WS_PONG_WAIT", "30s")]);
        assert_eq!(error.variable, "WS_PING_INTERVAL", "{error}");
        assert!(error.message.contains("WS_PONG_WAIT"), "{error}");
    }

    #[test]
    fn accepted_spellings() {
        for (text, level) in [
            ("debug", LevelFilter::Debug),
            ("DEBUG", LevelFilter::Debug),
            ("Info", LevelFilter::Info),
            ("warn", LevelFilter::Warn),
            ("warning", LevelFilter::Warn),
            ("error", LevelFilter::Error),
            ("dpanic", LevelFilter::Error),
            ("panic", LevelFilter::Error),
            ("FATAL", LevelFilter::Error),
        ] {
            assert_eq!(
                config(&[("LOGGER_LEVEL", text)]).unwrap().log_level,
                level,
                "{text}"
            );
        }
        assert_eq!(
            config(&[("LOGGER_ENCODING", "JSON")]).unwrap().log_encoding,
            LogEncoding::Json
        );
        for text in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(config(&[("REDIS_USE_TLS", text)]).unwrap().redis.use_tls);
        }
        for text in ["0", "f", "F", "FALSE", "false", "False"] {
            assert!(!config(&[("REDIS_USE_TLS", text)]).unwrap().redis.use_tls);
        }
        for (name, algorithm) in JWT_ALGORITHMS {
            for spelling in [name.to_string(), name.to_lowercase(), name.to_uppercase()] {
                let config = config(&[("JWT_ALGORITHM", &spelling)]).unwrap();
                assert_eq!(config.jwt.algorithm, Some(algorithm), "{spelling}");
            }
        }
        assert_eq!(
            JWT_ALGORITHMS.len(),
            12,
            "every algorithm jsonwebtoken verifies"
        );
        let config = config(&[("WS_PORT", "65535"), ("WS_MAX_CONNECTIONS_PER_USER", "0")]).unwrap();
        assert_eq!(config.port, 65535);
    }

    #[test]
    fn ipv6_listen_address() {
        for host in ["::1", "[::1]"] {
            let config = config(&[("WS_HOST", host), ("WS_PORT", "9001")]).unwrap();
            assert_eq!(config.host, "::1");
            assert_eq!(config.listen_addr_text(), "[::1]:9001");
            let addr: std::net::SocketAddr = config.listen_addr_text().parse().unwrap();
            assert_eq!(addr.port(), 9001);
        }
        let config = config(&[("WS_HOST", "localhost")]).unwrap();
        assert_eq!(config.listen_addr_text(), "localhost:8081");
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        let ok: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("5s", secs(5)),
            ("30s", secs(30)),
            ("+5s", secs(5)),
            ("500ms", ms(500)),
            ("5m", secs(300)),
            ("1m30s", secs(90)),
            ("1.5h", secs(5400)),
            ("2h45m", secs(2 * 3600 + 45 * 60)),
            ("1h15m30.918273645s", Duration::new(4530, 918_273_645)),
            ("1.0s", secs(1)),
            ("1.s", secs(1)),
            (".5s", ms(500)),
            ("0.5s", ms(500)),
            ("1.004s", ms(1004)),
            ("1.0040s", ms(1004)),
            ("100.00100s", Duration::new(100, 1_000_000)),
            ("10ns", Duration::from_nanos(10)),
            ("11us", Duration::from_micros(11)),
            ("12µs", Duration::from_micros(12)), // U+00B5 micro sign
            ("12μs", Duration::from_micros(12)), // U+03BC Greek mu
            ("13ms", ms(13)),
            ("14s", secs(14)),
            ("15m", secs(15 * 60)),
            ("16h", secs(16 * 3600)),
            ("3h30m", secs(3 * 3600 + 30 * 60)),
            ("10.5s4m", secs(4 * 60 + 10) + ms(500)),
            ("1h1m1s1ms1us1ns", Duration::new(3661, 1_001_001)),
            ("39h9m14.425s", Duration::new(140_954, 425_000_000)),
            ("52763797000ns", Duration::from_nanos(52_763_797_000)),
            ("0.3333333333333333333h", secs(1200)),
            (
                "9007199254740993ns",
                Duration::from_nanos(9_007_199_254_740_993),
            ),
            (
                "9223372036854775807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            (
                "9223372036854775.807us",
                Duration::from_nanos(i64::MAX as u64),
            ),
            (
                "9223372036s854ms775us807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            ("0.100000000000000000000h", secs(360)),
            (
                "0.9223372036854775807h",
                Duration::from_nanos(3_320_413_933_268),
            ),
            ("2562047h", secs(2_562_047 * 3600)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Ok(*expected), "{text}");
        }
        let bad = [
            "",
            "+",
            "-",
            "-0",
            "-1s",
            "-1.5h",
            "3",
            "5",
            "1.5",
            "s",
            ".",
            ".s",
            "+.s",
            "1d",
            "1x",
            "1 s",
            " 1s",
            "1s ",
            "1S",
            "1sec",
            "1h-5m",
            "1e3s",
            "3000000h",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "2562048h",
            "99999999999999999999999999s",
        ];
        for text in bad {
            assert!(parse_duration(text).is_err(), "{text:?} should be an error");
        }
        let message = parse_duration("10x").unwrap_err();
        assert!(
            message.contains("\"10x\"") && message.contains("unit"),
            "{message}"
        );
    }

    #[test]
    fn redis_url_forms() {
        let redis = redis_url("redis://localhost");
        assert_eq!(
            (redis.host.as_str(), redis.port, redis.db, redis.use_tls),
            ("localhost", 6379, 0, false)
        );
        assert_eq!((redis.username, redis.password), (None, None));

        let redis = redis_url("redis://user:pass@redis.example.com:6380/2");
        assert_eq!(redis.host, "redis.example.com");
        assert_eq!(redis.port, 6380);
        assert_eq!(redis.username.as_deref(), Some("user"));
        assert_eq!(redis.password.as_deref(), Some("pass"));
        assert_eq!(redis.db, 2);
        assert!(!redis.use_tls);

        let redis = redis_url("redis://:only-pass@10.0.0.5:7000");
        assert_eq!(redis.username, None);
        assert_eq!(redis.password.as_deref(), Some("only-pass"));
        assert_eq!((redis.host.as_str(), redis.port), ("10.0.0.5", 7000));

        let redis = redis_url("redis://someone@host");
        assert_eq!(redis.username.as_deref(), Some("someone"));
        assert_eq!(redis.password, None);

        let redis = redis_url("rediss://u:p@cache.example.com:6390/15");
        assert!(redis.use_tls);
        assert_eq!((redis.port, redis.db), (6390, 15));
        assert!(redis_url("REDISS://cache").use_tls);

        let redis = redis_url("redis://[::1]:6381/4");
        assert_eq!(
            (redis.host.as_str(), redis.port, redis.db),
            ("::1", 6381, 4)
        );
        let redis = redis_url("redis://:pw@[2001:db8::7]");
        assert_eq!((redis.host.as_str(), redis.port), ("2001:db8::7", 6379));
        assert_eq!(redis.password.as_deref(), Some("pw"));

        let redis = redis_url("redis://host/");
        assert_eq!(redis.db, 0);
        let redis = redis_url("redis://host:6379/3?protocol=3&dial_timeout=3s");
        assert_eq!(redis.db, 3);
        let redis = redis_url("redis://host?db=9");
        assert_eq!((redis.host.as_str(), redis.db), ("host", 0));
        let redis = redis_url("redis://");
        assert_eq!((redis.host.as_str(), redis.port), ("localhost", 6379));

        // Percent-encoded user info, and an unescaped '@' in the password.
        let redis = redis_url("redis://app%20user:p%40ss%3Aw%2Fo%25rd@host");
        assert_eq!(redis.username.as_deref(), Some("app user"));
        assert_eq!(redis.password.as_deref(), Some("p@ss:w/o%rd"));
        let redis = redis_url("redis://:p@ss@host:1234");
        assert_eq!(redis.password.as_deref(), Some("p@ss"));
        assert_eq!((redis.host.as_str(), redis.port), ("host", 1234));
        // '+' is not a space in user info.
        assert_eq!(redis_url("redis://:a+b@h").password.as_deref(), Some("a+b"));
    }

    #[test]
    fn redis_url_overrides_redis_variables() {
        let config = config(&[
            ("REDIS_URL", "redis://h1:7001"),
            ("REDIS_HOST", "h2"),
            ("REDIS_PORT", "not-read"),
            ("REDIS_PASSWORD", "env-pass"),
            ("REDIS_USERNAME", "env-user"),
            ("REDIS_DB", "5"),
            ("REDIS_USE_TLS", "true"),
            ("REDIS_CHANNEL_PREFIX", "p:"),
            ("REDIS_TLS_CA_FILE", "/ca.pem"),
        ])
        .unwrap();
        let redis = config.redis;
        assert_eq!((redis.host.as_str(), redis.port, redis.db), ("h1", 7001, 0));
        assert_eq!(
            (redis.username, redis.password, redis.use_tls),
            (None, None, false)
        );
        // Not part of the URL: still read.
        assert_eq!(redis.channel_prefix, "p:");
        assert_eq!(redis.tls_ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn bad_redis_urls() {
        let error = redis_url_error("http://host:6379");
        assert!(error.message.contains("redis://"), "{error}");
        redis_url_error("host:6379");
        redis_url_error("redis:/host");
        redis_url_error("unix:///tmp/redis.sock");

        let error = redis_url_error("redis://host:80x");
        assert!(error.message.contains("port"), "{error}");
        redis_url_error("redis://host:0");
        redis_url_error("redis://host:65536");
        redis_url_error("redis://host:");
        redis_url_error("redis://[::1]:x");
        redis_url_error("redis://[::1");
        redis_url_error("redis://[::1]6379");
        redis_url_error("redis://[zz::1]:6379");
        redis_url_error("redis://::1:6379");
        redis_url_error("redis://host/x");
        redis_url_error("redis://host/-1");
        redis_url_error("redis://host/1/2");
        redis_url_error("redis://my host");
        redis_url_error("redis://:%FF%FE@host");
    }

    #[test]
    fn redis_url_errors_never_echo_the_password() {
        let secret = "Sup3rS3cretPw";
        for url in [
            format!("http://user:{secret}@host"),
            format!("redis://user:{secret}@host:80x"),
            format!("redis://user:{secret}@host/db"),
            format!("redis://user:{secret}@[::1"),
            format!("redis://user:{secret}@::1:6379"),
            format!("redis://user:{secret}@my host"),
            format!("redis://:{secret}"),
            format!("redis://user:{secret}"),
            format!("redis://:{secret}/0"),
            format!("redis://:{secret}:6379"),
            format!("redis://[{secret}]"),
            format!("redis://[::1]{secret}"),
            format!("redis://host/{secret}"),
            secret.to_string(),
        ] {
            let error = redis_url_error(&url);
            assert!(!error.to_string().contains(secret), "{error}");
            assert!(!format!("{error:?}").contains(secret), "{error:?}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let config = config(&[
            ("JWT_SECRET_KEY", "jwt-very-secret"),
            ("REDIS_URL", "redis://alice:redis-very-secret@host"),
        ])
        .unwrap();
        let text = format!("{config:?}");
        let pretty = format!("{config:#?}");
        for shown in [&text, &pretty] {
            assert!(!shown.contains("jwt-very-secret"), "{shown}");
            assert!(!shown.contains("redis-very-secret"), "{shown}");
            assert!(shown.contains("secret: <redacted>"), "{shown}");
            assert!(shown.contains("password: <redacted>"), "{shown}");
            assert!(shown.contains("alice"), "{shown}");
        }
        let redis_text = format!("{:?}", config.redis);
        assert!(!redis_text.contains("redis-very-secret"));
        let jwt_text = format!("{:?}", config.jwt);
        assert!(!jwt_text.contains("jwt-very-secret"));

        let unset = super::tests::config(&[]).unwrap();
        assert!(format!("{unset:?}").contains("password: None"));
    }

    #[test]
    fn cookie_auth_requires_an_origin_list() {
        let error = error_for(&[("JWT_COOKIE_NAME", "session")]);
        assert_eq!(error.variable, "JWT_COOKIE_NAME");
        assert!(error.message.contains("WS_ALLOWED_ORIGINS"), "{error}");
        // A list of only separators is no list.
        let error = error_for(&[
            ("JWT_COOKIE_NAME", "session"),
            ("WS_ALLOWED_ORIGINS", " , "),
        ]);
        assert_eq!(error.variable, "JWT_COOKIE_NAME");
        let config = config(&[
            ("JWT_COOKIE_NAME", "session"),
            ("WS_ALLOWED_ORIGINS", "https://app.example"),
        ])
        .unwrap();
        assert_eq!(config.jwt.cookie_name.as_deref(), Some("session"));
    }

    #[test]
    fn tls_ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("ws-notify-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.join("missing.pem");
        for path in [&not_pem, &missing, &dir] {
            let path = path.to_str().unwrap();
            let error = error_for(&[("REDIS_USE_TLS", "true"), ("REDIS_TLS_CA_FILE", path)]);
            assert_eq!(error.variable, "REDIS_TLS_CA_FILE", "{path}: {error}");
            assert!(error.message.contains(path), "{error}");
            // Through rediss:// as well.
            let error = error_for(&[("REDIS_URL", "rediss://host"), ("REDIS_TLS_CA_FILE", path)]);
            assert_eq!(error.variable, "REDIS_TLS_CA_FILE", "{path}: {error}");
        }
        let with_ca =
            config(&[("REDIS_USE_TLS", "true"), ("REDIS_TLS_CA_FILE", CA_FIXTURE)]).unwrap();
        assert_eq!(with_ca.redis.tls_ca_file, Some(PathBuf::from(CA_FIXTURE)));
        // Without TLS the file is not used, so not read.
        let path = missing.to_str().unwrap();
        assert!(config(&[("REDIS_TLS_CA_FILE", path)]).is_ok());
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("65536"), Ok(65536));
        assert_eq!(parse_byte_size("1B"), Ok(1));
        assert_eq!(parse_byte_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_byte_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_byte_size("2GiB"), Ok(2 << 30));
        assert!(parse_byte_size("1 MiB").is_err());
        assert!(parse_byte_size("1.5MiB").is_err());
    }

    #[test]
    fn template_env_lists_every_variable_with_its_default() {
        let template = include_str!("../template.env");
        let mut active: HashMap<String, String> = HashMap::new();
        for line in template.lines() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {line:?}"));
            assert!(!key.contains(' ') && !value.starts_with(' '), "{line:?}");
            assert!(!value.contains(['"', '\'']), "no quotes please: {line:?}");
            active.insert(key.to_string(), value.to_string());
        }
        for name in VARIABLES {
            let set = active.contains_key(*name);
            let commented = template
                .lines()
                .any(|line| line.starts_with(&format!("# {name}=")));
            assert!(set || commented, "template.env does not list {name}");
        }
        assert_eq!(
            active.get("JWT_SECRET_KEY").map(String::as_str),
            Some("dev-secret-change-me")
        );
        assert!(!active.contains_key("REDIS_URL"));
        let from_template = Config::from_lookup(|name| active.get(name).cloned()).unwrap();
        let mut expected = config(&[]).unwrap();
        expected.jwt.secret = Some("dev-secret-change-me".into());
        assert_eq!(from_template, expected);
    }
}
