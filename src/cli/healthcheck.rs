//! `ws-notify healthcheck`: `GET /health` over a plain `TcpStream` with a 2 s
//! limit; exit 0 on 200, 1 otherwise (503 degraded, refused, timed out).
//! It is the container image's `HEALTHCHECK` (distroless has no shell or
//! curl), so it reads the same `WS_HOST`/`WS_PORT` (or `WS_ADMIN_ADDR`) as the server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{Arg, EXIT_FAILURE, ParseStop, Parser, local_health_endpoint};

pub const USAGE: &str = "\
Usage: ws-notify healthcheck [--url <http-url>]

GETs the gateway's /health and exits 0 if it answers 200 (healthy), 1 on
anything else: 503 (degraded: not subscribed to Redis), no answer within 2 s,
connection refused. Prints the answer's status line and body.

  --url <http-url>   default http://127.0.0.1:<WS_PORT>/health, or the
                     WS_ADMIN_ADDR port when that is set (http:// only)

Used by the container image: HEALTHCHECK CMD [\"/usr/local/bin/ws-notify\",\"healthcheck\"]";

/// The whole check (connect, send, read) must finish within this.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The answer is read up to this size; /health bodies are a few hundred bytes.
const MAX_RESPONSE: usize = 16 * 1024;

/// Where to send the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthcheckArgs {
    /// Host as written in the URL (IPv6 in brackets), for `Host:` and resolving.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

pub fn parse(parser: &mut Parser) -> Result<HealthcheckArgs, ParseStop> {
    let mut url = None;
    while let Some(arg) = parser.next_arg()? {
        match arg {
            Arg::Option(name, inline) if name == "url" => url = Some(parser.value("url", inline)?),
            Arg::Option(name, _) => return Err(parser.unknown_option(&name)),
            Arg::Positional(arg) => return Err(parser.unexpected(&arg)),
        }
    }
    match url {
        Some(url) => parse_url(&url).map_err(ParseStop::Usage),
        None => {
            let (host, port) = local_health_endpoint().map_err(ParseStop::Usage)?;
            Ok(HealthcheckArgs {
                host,
                port,
                path: "/health".to_string(),
            })
        }
    }
}

/// `http://host[:port][/path]`.
fn parse_url(url: &str) -> Result<HealthcheckArgs, String> {
    let bad = |why: &str| format!("--url {url:?}: {why}");
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(bad("only http:// URLs are supported"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (inner, after) = after.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("junk after ]")),
        };
        (format!("[{inner}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("no host"));
    }
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad("whitespace in the path"));
    }
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(bad("bad port")),
        },
    };
    Ok(HealthcheckArgs { host, port, path })
}

pub fn run(args: &HealthcheckArgs) -> ExitCode {
    match check(args, TIMEOUT) {
        Ok((status, status_line, body)) => {
            println!("{status_line}");
            if !body.is_empty() {
                println!("{body}");
            }
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!(
                "ws-notify healthcheck: http://{}:{}{}: {e}",
                args.host, args.port, args.path
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Sends the GET and returns (status, status line, body), all within `timeout`.
pub fn check(args: &HealthcheckArgs, timeout: Duration) -> Result<(u16, String, String), String> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {} ms", timeout.as_millis()))
    };
    let bare_host = args.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (bare_host, args.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {bare_host}: {e}"))?
        .collect();
    let mut stream = None;
    let mut last = format!("{bare_host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: ws-notify-healthcheck\r\nConnection: close\r\n\r\n",
        args.path, args.host, args.port
    );
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&chunk[..n]);
                if response.len() >= MAX_RESPONSE || complete(&response) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer within {} ms", timeout.as_millis()));
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    parse_response(&response)
}

/// Whether `response` holds the whole head and `Content-Length` body bytes.
fn complete(response: &[u8]) -> bool {
    let Some(head_end) = find(response, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..head_end]);
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    length.is_some_and(|len| response.len() >= head_end + 4 + len)
}

fn parse_response(response: &[u8]) -> Result<(u16, String, String), String> {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default().to_string();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| format!("bad status line {status_line:?}"))?,
        _ if response.is_empty() => return Err("connection closed without an answer".to_string()),
        _ => return Err(format!("not an HTTP answer: {status_line:?}")),
    };
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .unwrap_or_default();
    Ok((status, status_line, body))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> HealthcheckArgs {
        parse_url(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn urls() {
        assert_eq!(
            url("http://127.0.0.1:8081/health"),
            HealthcheckArgs {
                host: "127.0.0.1".into(),
                port: 8081,
                path: "/health".into()
            }
        );
        assert_eq!(url("http://gw").port, 80);
        assert_eq!(url("http://gw").path, "/");
        assert_eq!(url("http://gw?x=1").path, "/?x=1");
        let v6 = url("http://[::1]:9/health");
        assert_eq!((v6.host.as_str(), v6.port), ("[::1]", 9));
        for bad in [
            "https://gw/health",
            "gw:8081",
            "http://:80/",
            "http://gw:0/",
            "http://gw:x/",
            "http://u:p@gw/",
            "http://[::1/",
            "http://gw/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert!(complete(ok));
        assert_eq!(
            parse_response(ok).unwrap(),
            (200, "HTTP/1.1 200 OK".to_string(), "{}".to_string())
        );
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}"));
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                .unwrap()
                .0,
            503
        );
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
    }
}
