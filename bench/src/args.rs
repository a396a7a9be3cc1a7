//! Command line: named presets, then explicit flags on top. Parsed by hand
//! (a dozen flags do not need clap).

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::Duration;

/// Printed by `--help`.
pub const USAGE: &str = "\
ws-notify-bench: load generator for ws-notify (connects to a running server and to Redis)

USAGE: ws-notify-bench [--preset NAME] [FLAGS]

PRESETS (explicit flags override their values):
  idle        hold 10,000 connections for --hold 5 s, report server memory
  one-to-one  10,000 connections, 10,000 users, 1,000,000 messages
  fanout      10,000 connections, 100 users (100 connections each), 20,000 messages
  latency     10,000 connections, 10,000 users, 100,000 messages at 10,000 msg/s
  handshake   connect, get 101 + `connected`, close, again, for --duration 5 s
  soak        hold 5,000 connections (3,750 users) for --duration 10m, close and reopen
              --churn 50 of them every second, publish --rate 1,000 msg/s to users
              with open connections; count delivered/expected, sample server RSS/fds
  resume      10,000 connections (one user each) record their `position`, all close;
              10 messages per user (-m: total, default 10 x users) are published
              with FCALL ws_notify_publish (server with WS_HISTORY_SIZE > 0); all
              reconnect with `since`, 1,000 handshakes in flight: resumed/s,
              replayed/s, time until the last client has every missed message,
              missing/duplicate per client
  reader      no gateway: the server's Redis reader in this process against
              --redis-url, flooded with 2,000,000 pipelined PUBLISHes (-m);
              messages/s handed over and the reader thread's CPU per message
  (no preset: 1,000 connections, 1,000 users, 10,000 messages)

FLAGS:
  --server HOST:PORT     ws-notify address (default 127.0.0.1:8081); its /metrics is
                         read before publishing and at the end for drop counts
  --redis-url URL        Redis to publish to (default redis://127.0.0.1:6379)
  --secret S             HS256 secret to sign tokens (default dev-secret-change-me)
  --user-claim NAME      claim that carries the user id (default sub)
  --channel-prefix P     Redis channel prefix (default user_noti:)
  -n, --connections N    WebSocket connections; connection i is user bench-{i % U}
  -u, --users U          distinct users
  -m, --messages M       messages to publish; message k goes to user bench-{k % U}
  --rate R               publish at R messages/s (default: as fast as possible)
  --batch B              PUBLISH commands per pipeline (default 1000)
  --threads T            client threads, each with its own mio Poll (default 2)
  --concurrency C        handshakes in flight at once, all threads (default 128;
                         resume 1,000: a reconnect storm)
  --connect-timeout D    a connection not open after D has failed (default 10s)
  --hold D               keep the connections open for D before publishing (idle: 5s)
  --drain-timeout D      stop waiting after D without a new delivery (default 5s)
  --duration D           handshake and soak: how long to churn (default 5s; soak 10m)
  --churn K              soak: connections closed (and as many opened) per second (default 50)
  --close-timeout D      soak: longest wait for a closing connection's outstanding
                         messages, then for the server's close (default 2s each)
  --sample-every D       soak: server RSS/fd sample interval (default 1m)
  --progress-every D     soak: progress line interval (default 10s)
  --source-addrs K       spread connections over 127.0.0.1..127.0.0.K (default: one
                         per quarter of the ephemeral port range; 8 for handshake)
  --server-pid PID       report that process's RSS (VmRSS) before and after, and its CPU time
                         (soak: also its open fds, /proc/PID/fd)
  --redis-pid PID        report redis-server's CPU time too (the machine has few cores)
  --no-metrics           do not read the server's /metrics
  -h, --help             this text

Durations: 5, 5s, 1.5s, 500ms, 2m. Output: one JSON line on stdout, a table on stderr.
Exit status: 0 when every connection opened and every expected message arrived,
3 when not, 2 for a usage error, 1 when Redis or the server could not be used.
";

/// A named scenario (README.md, "Load testing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Custom,
    Idle,
    OneToOne,
    Fanout,
    Latency,
    Handshake,
    Soak,
    Resume,
    /// The Redis reader alone, in-process (src/reader.rs).
    Reader,
}

impl Preset {
    fn parse(name: &str) -> Option<Preset> {
        Some(match name {
            "idle" => Preset::Idle,
            "one-to-one" => Preset::OneToOne,
            "fanout" => Preset::Fanout,
            "latency" => Preset::Latency,
            "handshake" => Preset::Handshake,
            "soak" => Preset::Soak,
            "resume" => Preset::Resume,
            "reader" => Preset::Reader,
            "custom" => Preset::Custom,
            _ => return None,
        })
    }

    /// The preset's name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Custom => "custom",
            Preset::Idle => "idle",
            Preset::OneToOne => "one-to-one",
            Preset::Fanout => "fanout",
            Preset::Latency => "latency",
            Preset::Handshake => "handshake",
            Preset::Soak => "soak",
            Preset::Resume => "resume",
            Preset::Reader => "reader",
        }
    }
}

/// Everything a run needs, presets and flags resolved.
#[derive(Debug, Clone)]
pub struct Options {
    pub preset: Preset,
    /// Connect + close repeatedly (the handshake preset) instead of holding.
    pub churn: bool,
    pub server: SocketAddrV4,
    /// `Host` header value: what was given to `--server`.
    pub host: String,
    pub redis_url: String,
    pub secret: String,
    pub user_claim: String,
    pub channel_prefix: String,
    pub connections: usize,
    pub users: usize,
    pub messages: u64,
    pub rate: Option<f64>,
    pub batch: usize,
    pub threads: usize,
    pub concurrency: usize,
    pub connect_timeout: Duration,
    pub hold: Duration,
    pub drain_timeout: Duration,
    pub duration: Duration,
    /// Soak: connections closed and reopened per second.
    pub churn_per_sec: usize,
    /// Soak: bound on each of the two waits of a churn close.
    pub close_timeout: Duration,
    /// Soak: server RSS/fd sample interval.
    pub sample_every: Duration,
    /// Soak: progress line interval.
    pub progress_every: Duration,
    pub source_addrs: Option<usize>,
    pub server_pid: Option<u32>,
    pub redis_pid: Option<u32>,
    pub metrics: bool,
}

/// A usage error, printed with a pointer to `--help`.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see --help)", self.0)
    }
}

/// What the command line asked for.
pub enum Command {
    Help,
    Run(Box<Options>),
}

/// Parses `5`, `5s`, `1.5s`, `500ms`, `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| Duration::from_secs_f64(value * scale))
}

/// Parses `1000000`, `1_000_000` or `1,000,000`.
fn parse_count(text: &str) -> Option<u64> {
    let digits: String = text.chars().filter(|c| !matches!(c, '_' | ',')).collect();
    digits.parse().ok()
}

fn resolve(server: &str) -> Result<SocketAddrV4, UsageError> {
    let addrs = server
        .to_socket_addrs()
        .map_err(|e| UsageError(format!("--server {server}: {e}")))?;
    for addr in addrs {
        if let SocketAddr::V4(v4) = addr {
            return Ok(v4);
        }
    }
    Err(UsageError(format!("--server {server}: no IPv4 address")))
}

/// Parses the arguments (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, UsageError> {
    let mut preset = Preset::Custom;
    let mut server = "127.0.0.1:8081".to_string();
    let mut redis_url = "redis://127.0.0.1:6379".to_string();
    let mut secret = "dev-secret-change-me".to_string();
    let mut user_claim = "sub".to_string();
    let mut channel_prefix = "user_noti:".to_string();
    let mut connections = None;
    let mut users = None;
    let mut messages = None;
    let mut rate = None;
    let mut batch = 1000;
    let mut threads = 2;
    let mut concurrency = None;
    let mut connect_timeout = Duration::from_secs(10);
    let mut hold = None;
    let mut drain_timeout = Duration::from_secs(5);
    let mut duration = None;
    let mut churn_per_sec = 50;
    let mut close_timeout = Duration::from_secs(2);
    let mut sample_every = Duration::from_secs(60);
    let mut progress_every = Duration::from_secs(10);
    let mut source_addrs = None;
    let mut server_pid = None;
    let mut redis_pid = None;
    let mut metrics = true;

    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (flag.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, UsageError> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| UsageError(format!("{name} needs {what}")))
        };
        let bad = |name: &str, v: &str| UsageError(format!("{name}: bad value {v:?}"));
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--preset" => {
                let v = value("a name")?;
                preset = Preset::parse(&v).ok_or_else(|| bad(&name, &v))?;
            }
            "--server" => server = value("HOST:PORT")?,
            "--redis-url" => redis_url = value("a URL")?,
            "--secret" => secret = value("a secret")?,
            "--user-claim" => user_claim = value("a claim name")?,
            "--channel-prefix" => channel_prefix = value("a prefix")?,
            "-n" | "--connections" | "-u" | "--users" | "-m" | "--messages" | "--batch"
            | "--threads" | "--concurrency" | "--source-addrs" | "--server-pid" | "--redis-pid"
            | "--churn" => {
                let v = value("a number")?;
                let n = parse_count(&v).ok_or_else(|| bad(&name, &v))?;
                match name.as_str() {
                    "-n" | "--connections" => connections = Some(n as usize),
                    "-u" | "--users" => users = Some(n as usize),
                    "-m" | "--messages" => messages = Some(n),
                    "--batch" => batch = n as usize,
                    "--threads" => threads = n as usize,
                    "--concurrency" => concurrency = Some(n as usize),
                    "--source-addrs" => source_addrs = Some(n as usize),
                    "--churn" => churn_per_sec = n as usize,
                    "--server-pid" => {
                        server_pid = Some(u32::try_from(n).map_err(|_| bad(&name, &v))?);
                    }
                    _ => redis_pid = Some(u32::try_from(n).map_err(|_| bad(&name, &v))?),
                }
            }
            "--rate" => {
                let v = value("messages/s")?;
                let r: f64 = v.parse().map_err(|_| bad(&name, &v))?;
                if !(r.is_finite() && r > 0.0) {
                    return Err(bad(&name, &v));
                }
                rate = Some(r);
            }
            "--connect-timeout" | "--hold" | "--drain-timeout" | "--duration"
            | "--close-timeout" | "--sample-every" | "--progress-every" => {
                let v = value("a duration")?;
                let d = parse_duration(&v).ok_or_else(|| bad(&name, &v))?;
                match name.as_str() {
                    "--connect-timeout" => connect_timeout = d,
                    "--hold" => hold = Some(d),
                    "--drain-timeout" => drain_timeout = d,
                    "--close-timeout" => close_timeout = d,
                    "--sample-every" => sample_every = d,
                    "--progress-every" => progress_every = d,
                    _ => duration = Some(d),
                }
            }
            "--no-metrics" => metrics = false,
            other => return Err(UsageError(format!("unknown argument {other:?}"))),
        }
    }

    // Preset values, then the explicit flags on top.
    let (p_conns, p_users, p_msgs, p_rate, p_hold) = match preset {
        Preset::Custom => (1_000, None, 10_000, None, 0.0),
        Preset::Idle => (10_000, None, 0, None, 5.0),
        Preset::OneToOne => (10_000, None, 1_000_000, None, 0.0),
        Preset::Fanout => (10_000, Some(100), 20_000, None, 0.0),
        Preset::Latency => (10_000, None, 100_000, Some(10_000.0), 0.0),
        Preset::Handshake => (10_000, None, 0, None, 0.0),
        Preset::Soak => (5_000, None, 0, Some(1_000.0), 0.0),
        // Messages: 10 per user, filled in below once the user count is known.
        Preset::Resume => (10_000, None, 0, None, 0.0),
        Preset::Reader => (1, None, 2_000_000, None, 0.0),
    };
    let resume = preset == Preset::Resume;
    let soak = preset == Preset::Soak;
    let connections = connections.unwrap_or(p_conns);
    // Soak default: 3N/4 users, so slots i and i + 3N/4 share a user for the
    // first N/4 users (two connections each) and the rest have one. Churn then
    // both removes whole users from the server's hub and removes one of a
    // user's two connections while the other keeps receiving.
    let p_users = p_users.or(soak.then(|| (connections * 3 / 4).max(1)));
    if resume && users.is_some_and(|u| u != connections) {
        return Err(UsageError(
            "--users: the resume preset has one user per connection".into(),
        ));
    }
    let users = users.or(p_users).unwrap_or(connections);
    let p_msgs = if resume { 10 * users as u64 } else { p_msgs };
    let churn = preset == Preset::Handshake;
    let options = Options {
        preset,
        churn,
        server: resolve(&server)?,
        host: server,
        redis_url,
        secret,
        user_claim,
        channel_prefix,
        connections,
        users,
        messages: if churn || soak {
            0
        } else {
            messages.unwrap_or(p_msgs)
        },
        rate: rate.or(p_rate),
        batch,
        threads,
        concurrency: concurrency.unwrap_or(if resume { 1_000 } else { 128 }),
        connect_timeout,
        hold: hold.unwrap_or(Duration::from_secs_f64(p_hold)),
        drain_timeout,
        duration: duration.unwrap_or(Duration::from_secs(if soak { 600 } else { 5 })),
        churn_per_sec,
        close_timeout,
        sample_every,
        progress_every,
        source_addrs,
        server_pid,
        redis_pid,
        metrics,
    };
    if options.connections == 0 && !churn {
        return Err(UsageError("--connections must be at least 1".into()));
    }
    if options.users == 0 || options.threads == 0 || options.concurrency == 0 {
        return Err(UsageError(
            "--users, --threads and --concurrency must be at least 1".into(),
        ));
    }
    if soak && (options.sample_every.is_zero() || options.progress_every.is_zero()) {
        return Err(UsageError(
            "--sample-every and --progress-every must be above 0".into(),
        ));
    }
    if soak && options.churn_per_sec > options.connections {
        return Err(UsageError("--churn: at most --connections".into()));
    }
    if options.batch == 0 || options.source_addrs == Some(0) {
        return Err(UsageError(
            "--batch and --source-addrs must be at least 1".into(),
        ));
    }
    if options.source_addrs.is_some_and(|k| k > 254) {
        return Err(UsageError(
            "--source-addrs: at most 254 (127.0.0.1..254)".into(),
        ));
    }
    Ok(Command::Run(Box::new(options)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Options {
        match parse(args.iter().map(|s| s.to_string())) {
            Ok(Command::Run(o)) => *o,
            Ok(Command::Help) => panic!("help"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn presets_fill_defaults_and_flags_override() {
        let o = run(&["--preset", "fanout"]);
        assert_eq!((o.connections, o.users, o.messages), (10_000, 100, 20_000));
        let o = run(&["--preset", "fanout", "-n", "1000", "--users=10"]);
        assert_eq!((o.connections, o.users), (1_000, 10));
        let o = run(&["--preset", "latency", "--connections", "1,000"]);
        assert_eq!(
            (o.connections, o.users, o.rate),
            (1_000, 1_000, Some(10_000.0))
        );
        let o = run(&["--preset", "idle"]);
        assert_eq!((o.messages, o.hold), (0, Duration::from_secs(5)));
        let o = run(&["--preset", "handshake", "--duration", "2s"]);
        assert!(o.churn);
        assert_eq!(o.duration, Duration::from_secs(2));
        let o = run(&["--preset", "soak"]);
        assert_eq!(
            (o.connections, o.users, o.rate, o.messages),
            (5_000, 3_750, Some(1_000.0), 0)
        );
        assert_eq!(
            (o.duration, o.churn_per_sec),
            (Duration::from_secs(600), 50)
        );
        let o = run(&[
            "--preset",
            "soak",
            "-n",
            "400",
            "--churn",
            "10",
            "--duration=1m",
        ]);
        assert_eq!((o.users, o.churn_per_sec), (300, 10));
        assert_eq!(o.duration, Duration::from_secs(60));
        assert!(!o.churn);
        let o = run(&["--preset", "resume"]);
        assert_eq!(
            (o.connections, o.users, o.messages),
            (10_000, 10_000, 100_000)
        );
        assert_eq!(o.concurrency, 1_000);
        assert_eq!(run(&["--preset", "one-to-one"]).concurrency, 128);
        let o = run(&["--preset", "resume", "-n", "500", "-m", "1500"]);
        assert_eq!((o.connections, o.users, o.messages), (500, 500, 1_500));
        let o = run(&["--preset", "resume", "-n", "500"]);
        assert_eq!(o.messages, 5_000);
    }

    #[test]
    fn rejects_bad_input() {
        for args in [
            &["--preset", "nope"][..],
            &["--connections"],
            &["--rate", "-1"],
            &["--hold", "soon"],
            &["--frobnicate"],
            &["--threads", "0"],
            &["--preset", "resume", "-n", "10", "-u", "5"],
        ] {
            assert!(
                parse(args.iter().map(|s| s.to_string())).is_err(),
                "{args:?}"
            );
        }
        assert!(matches!(parse(["-h".to_string()]), Ok(Command::Help)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("-1"), None);
    }
}
