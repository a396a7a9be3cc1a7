//! `ws-notify publish`: publishes `{"type":..,"payload":..}` to
//! `<REDIS_CHANNEL_PREFIX><user>` on the Redis the server is configured for
//! (the same `REDIS_*` variables, TLS and CA file included), after checking
//! that the payload is JSON. The payload's bytes are sent as given. With
//! `WS_HISTORY_SIZE` set, it publishes through the Redis function
//! `ws_notify_publish` (loading the library if Redis lacks it), so that the
//! message is kept for resuming clients, and prints the message's id. With
//! `REDIS_SUBSCRIBE_MODE=sharded` it publishes with `SPUBLISH` (or
//! `ws_notify_spublish`) on the cluster master that owns the channel's slot.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::value::RawValue;

use super::{Arg, EXIT_FAILURE, EXIT_USAGE, ParseStop, Parser};
use crate::cluster;
use crate::config::{Config, SubscribeMode};
use crate::history::{library_code, load_library};
use crate::message::validate_published;
use crate::redis_reader::build_client;

pub const USAGE: &str = "\
Usage: ws-notify publish <user> <type> [<json-payload>]

Publishes {\"type\":<type>,\"payload\":<json-payload>} to the channel
<REDIS_CHANNEL_PREFIX><user> (default user_noti:<user>) on the Redis configured
by REDIS_URL or REDIS_HOST/REDIS_PORT/... (as the server reads them), and prints
the number of Redis subscribers that received it: gateway instances, not
WebSocket clients. With WS_HISTORY_SIZE set (history on), it publishes with
the Redis function ws_notify_publish instead (loading the function library
with WS_HISTORY_SIZE and WS_HISTORY_TTL if Redis lacks it) and prints the
message's id. With REDIS_SUBSCRIBE_MODE=sharded it publishes on the Redis
Cluster of REDIS_CLUSTER_NODES with SPUBLISH (or ws_notify_spublish), on the
master that owns the channel's slot. The payload must be JSON (default null);
put -- before arguments that start with '-'.

Example: ws-notify publish alice order_shipped '{\"order_id\":42}'

Exit codes: 0 published, 1 Redis unreachable or refused, 2 a bad argument or
configuration.";

/// How long connecting to Redis and the PUBLISH may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The parsed `publish` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    pub user: String,
    pub kind: String,
    /// JSON text, checked.
    pub payload: String,
}

pub fn parse(parser: &mut Parser) -> Result<PublishArgs, ParseStop> {
    let mut positionals = Vec::new();
    while let Some(arg) = parser.next_arg()? {
        match arg {
            Arg::Option(name, _) => return Err(parser.unknown_option(&name)),
            Arg::Positional(arg) if positionals.len() < 3 => positionals.push(arg),
            Arg::Positional(arg) => return Err(parser.unexpected(&arg)),
        }
    }
    let mut positionals = positionals.into_iter();
    let (Some(user), Some(kind)) = (positionals.next(), positionals.next()) else {
        return Err(ParseStop::Usage(
            "publish needs <user> and <type>".to_string(),
        ));
    };
    if user.is_empty() {
        return Err(ParseStop::Usage("<user> must not be empty".to_string()));
    }
    let payload = positionals.next().unwrap_or_else(|| "null".to_string());
    if let Err(e) = serde_json::from_str::<&RawValue>(&payload) {
        return Err(ParseStop::Usage(format!(
            "the payload is not JSON ({e}): {payload:?} (quote strings: '\"text\"')"
        )));
    }
    Ok(PublishArgs {
        user,
        kind,
        payload,
    })
}

/// The message as the gateway expects it (README: "Publishing").
pub fn message(args: &PublishArgs) -> String {
    let kind = serde_json::Value::from(args.kind.as_str());
    format!(r#"{{"type":{kind},"payload":{}}}"#, args.payload.trim())
}

/// The configuration as the server reads it; only the Redis and history
/// settings matter to a publisher, so the JWT settings the server requires are
/// filled in and a publisher's environment needs none.
pub fn publisher_config() -> Result<Config, crate::config::ConfigError> {
    Config::from_lookup(|name| {
        let value = super::env_var(name);
        if name == "JWT_SECRET_KEY" && value.is_none() {
            return Some("unused-by-publish".to_string());
        }
        value
    })
}

pub fn run(args: &PublishArgs) -> ExitCode {
    let config = match publisher_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-notify publish: invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let message = message(args);
    if let Err(e) = validate_published(message.as_bytes()) {
        // Unreachable with a JSON payload, but the gateway would drop it.
        eprintln!("ws-notify publish: the gateway would refuse {message}: {e:?}");
        return ExitCode::from(EXIT_USAGE);
    }
    let channel = format!("{}{}", config.redis.channel_prefix, args.user);
    let redis = &config.redis;
    let (target, result) = if redis.subscribe_mode == SubscribeMode::Sharded {
        let seeds = cluster::seeds(redis)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        (
            format!("Cluster {seeds}"),
            publish_sharded(&config, &channel, &message),
        )
    } else {
        (
            format!("{}:{} db {}", redis.host, redis.port, redis.db),
            publish_single(&config, &channel, &message),
        )
    };
    match result {
        Ok(Published::Id(id)) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Ok(Published::Receivers(receivers)) => {
            println!("{receivers}");
            if receivers == 0 {
                eprintln!(
                    "ws-notify publish: no subscriber on {channel}: is a gateway connected to this Redis?"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ws-notify publish: Redis {target}: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// PUBLISH, or FCALL ws_notify_publish with history on, on the one Redis.
fn publish_single(config: &Config, channel: &str, message: &str) -> Result<Published, String> {
    build_client(&config.redis)
        .map_err(|e| e.to_string())
        .and_then(|client| {
            client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .map_err(|e| format!("connect: {e}"))
        })
        .and_then(|mut con| {
            con.set_read_timeout(Some(REDIS_TIMEOUT))
                .and_then(|()| con.set_write_timeout(Some(REDIS_TIMEOUT)))
                .map_err(|e| format!("connect: {e}"))?;
            if config.history_size > 0 {
                return publish_with_history(&mut con, config, channel, message).map(Published::Id);
            }
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query::<i64>(&mut con)
                .map(Published::Receivers)
                .map_err(|e| format!("PUBLISH: {e}"))
        })
}

/// `REDIS_SUBSCRIBE_MODE=sharded`: SPUBLISH, or FCALL ws_notify_spublish with
/// history on, on the master that owns the channel's slot (found with
/// CLUSTER SHARDS from the seeds; a MOVED reply is followed once). When the
/// function is missing, the library is loaded on every master, since the
/// next user's channel may live on any of them.
fn publish_sharded(config: &Config, channel: &str, message: &str) -> Result<Published, String> {
    let mut nodes = cluster::Nodes::new(config.redis.clone(), REDIS_TIMEOUT, None);
    nodes.refresh()?;
    if config.history_size == 0 {
        let mut spublish = redis::cmd("SPUBLISH");
        spublish.arg(channel).arg(message);
        return nodes
            .query_routed::<i64>(channel.as_bytes(), &spublish)
            .map(Published::Receivers)
            .map_err(|e| format!("SPUBLISH: {e}"));
    }
    let mut fcall = redis::cmd("FCALL");
    fcall
        .arg("ws_notify_spublish")
        .arg(1)
        .arg(channel)
        .arg(message);
    match nodes.query_routed::<String>(channel.as_bytes(), &fcall) {
        Ok(id) => Ok(Published::Id(id)),
        Err(e) if e.to_string().contains("Function not found") => {
            let library = library_code(config.history_size, config.history_ttl);
            nodes.load_library_everywhere(&library)?;
            nodes
                .query_routed::<String>(channel.as_bytes(), &fcall)
                .map(Published::Id)
                .map_err(|e| format!("FCALL ws_notify_spublish: {e}"))
        }
        Err(e) => Err(format!("FCALL ws_notify_spublish: {e}")),
    }
}

/// What Redis answered.
enum Published {
    /// PUBLISH: the number of subscribers (gateway instances) that got it.
    Receivers(i64),
    /// FCALL ws_notify_publish: the message's stream id.
    Id(String),
}

/// `FCALL ws_notify_publish 1 <channel> <message>`; when Redis lacks the
/// function (a fresh or restarted Redis, no gateway with history started yet),
/// loads the library with this configuration's size and TTL and calls again.
fn publish_with_history(
    con: &mut redis::Connection,
    config: &Config,
    channel: &str,
    message: &str,
) -> Result<String, String> {
    let fcall = |con: &mut redis::Connection| {
        redis::cmd("FCALL")
            .arg("ws_notify_publish")
            .arg(1)
            .arg(channel)
            .arg(message)
            .query::<String>(con)
    };
    match fcall(con) {
        Ok(id) => Ok(id),
        Err(e) if e.to_string().contains("Function not found") => {
            let library = library_code(config.history_size, config.history_ttl);
            load_library(con, &library)?;
            fcall(con).map_err(|e| format!("FCALL ws_notify_publish: {e}"))
        }
        Err(e) => Err(format!("FCALL ws_notify_publish: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kind: &str, payload: &str) -> PublishArgs {
        PublishArgs {
            user: "alice".to_string(),
            kind: kind.to_string(),
            payload: payload.to_string(),
        }
    }

    #[test]
    fn message_keeps_the_payload_bytes() {
        assert_eq!(
            message(&args("order_shipped", r#"{"b":1, "a":[1.50]}"#)),
            r#"{"type":"order_shipped","payload":{"b":1, "a":[1.50]}}"#
        );
        assert_eq!(
            message(&args("quote\"d", " null\n")),
            r#"{"type":"quote\"d","payload":null}"#
        );
        assert!(validate_published(message(&args("t", "[1,2]")).as_bytes()).is_ok());
    }
}
