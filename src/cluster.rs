//! Redis Cluster for `REDIS_SUBSCRIBE_MODE=sharded`: which slot a key or shard
//! channel hashes to, which master serves that slot, and blocking connections
//! to the masters for commands (publishing, history reads, loading the
//! function library). Used by whichever thread holds a [`Nodes`]: the history
//! reader, `ws-notify publish`.
//!
//! ```text
//!  REDIS_CLUSTER_NODES seeds --CLUSTER SHARDS (7.0+; else CLUSTER SLOTS)--> Topology
//!      slot ranges -> master (+ replicas)
//!  key_slot(key) = CRC16-XMODEM(hash tag or key) mod 16384
//!  Nodes::query_routed(key, cmd): the owner of the key's slot; a MOVED reply
//!      refreshes the topology and is followed once
//! ```
//!
//! Own routing rather than the redis crate's `cluster` feature: the gateway
//! needs the topology itself (one pub/sub link per master), and the commands it
//! routes are few and single-key.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use log::{debug, info, warn};
use redis::{Client, Connection, Value};

use crate::config::RedisConfig;
use crate::history::load_library;

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The slot of a key or shard channel, as `CLUSTER KEYSLOT` computes it:
/// CRC16 (XMODEM) of the hash tag, if the key has one, else of the whole key.
/// The hash tag is what lies between the first `{` and the first `}` after
/// it, when that is not empty.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16_xmodem(hash_tag(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|b| *b == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|b| *b == b'}')
            && close > 0
        {
            return &rest[..close];
        }
    }
    key
}

/// CRC16 with polynomial 0x1021, initial value 0, no reflection (XMODEM), as
/// in the Redis Cluster specification.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// A node's address as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl NodeAddr {
    pub fn new(host: impl Into<String>, port: u16) -> NodeAddr {
        NodeAddr {
            host: host.into(),
            port,
        }
    }

    /// `host:port` as Redis writes it in a MOVED reply (IPv6 unbracketed:
    /// the port is after the last colon). An empty host means the node that
    /// answered (`asked`).
    fn parse(text: &str, asked: &str) -> Option<NodeAddr> {
        let (host, port) = text.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { asked } else { host };
        Some(NodeAddr::new(host, port.parse().ok()?))
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One shard: the slot ranges of one master, and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
    pub master: NodeAddr,
    pub replicas: Vec<NodeAddr>,
}

/// Which master serves which slots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    shards: Vec<Shard>,
    /// `(start, end, shard index)`, sorted by start, not overlapping.
    ranges: Vec<(u16, u16, usize)>,
}

impl Topology {
    /// Builds the slot index; shards without slots (a master being added) are
    /// kept, since a link to them costs nothing until they get slots.
    pub fn new(shards: Vec<Shard>) -> Topology {
        let mut ranges: Vec<(u16, u16, usize)> = shards
            .iter()
            .enumerate()
            .flat_map(|(i, shard)| shard.slots.iter().map(move |(s, e)| (*s, *e, i)))
            .filter(|(start, end, _)| start <= end && *end < SLOTS)
            .collect();
        ranges.sort_unstable();
        Topology { shards, ranges }
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The master serving `slot`; None while no master serves it.
    pub fn master_for_slot(&self, slot: u16) -> Option<&NodeAddr> {
        let at = self.ranges.partition_point(|(start, _, _)| *start <= slot);
        let (start, end, shard) = *self.ranges.get(at.checked_sub(1)?)?;
        (start..=end)
            .contains(&slot)
            .then(|| &self.shards[shard].master)
    }

    /// The master serving `key`'s slot.
    pub fn master_for_key(&self, key: &[u8]) -> Option<&NodeAddr> {
        self.master_for_slot(key_slot(key))
    }

    /// Every master, once each, in the order of their first slot.
    pub fn masters(&self) -> impl Iterator<Item = &NodeAddr> {
        self.shards.iter().map(|shard| &shard.master)
    }

    /// How many slots no master serves (0 on a healthy cluster).
    pub fn unserved_slots(&self) -> u32 {
        let served: u32 = self
            .ranges
            .iter()
            .map(|(start, end, _)| u32::from(end - start) + 1)
            .sum();
        u32::from(SLOTS).saturating_sub(served)
    }
}

/// A client for `node` with the credentials and TLS settings of `config`
/// (database 0: a cluster has no other).
pub fn node_client(config: &RedisConfig, node: &NodeAddr) -> std::io::Result<Client> {
    let mut at_node = config.clone();
    at_node.host.clone_from(&node.host);
    at_node.port = node.port;
    at_node.db = 0;
    crate::redis_reader::build_client(&at_node)
}

/// Opens a blocking connection to `node` with `io_wait` as connect, read and
/// write timeout.
pub fn connect(
    config: &RedisConfig,
    node: &NodeAddr,
    io_wait: Duration,
) -> Result<Connection, String> {
    let client = node_client(config, node).map_err(|e| format!("{node}: {e}"))?;
    let con = client
        .get_connection_with_timeout(io_wait)
        .map_err(|e| format!("{node}: connect: {e}"))?;
    con.set_read_timeout(Some(io_wait))
        .and_then(|()| con.set_write_timeout(Some(io_wait)))
        .map_err(|e| format!("{node}: connect: {e}"))?;
    Ok(con)
}

/// The seeds of `REDIS_CLUSTER_NODES`.
pub fn seeds(config: &RedisConfig) -> Vec<NodeAddr> {
    config
        .cluster_nodes
        .iter()
        .map(|(host, port)| NodeAddr::new(host.clone(), *port))
        .collect()
}

/// Asks the nodes in `candidates`, in order, for the topology; the first
/// answer wins. The error names every node tried.
pub fn discover(
    config: &RedisConfig,
    candidates: &[NodeAddr],
    io_wait: Duration,
) -> Result<Topology, String> {
    let mut errors = Vec::new();
    for node in candidates {
        let asked = connect(config, node, io_wait)
            .and_then(|mut con| query_topology(&mut con, &node.host, config.use_tls))
            .map_err(|e| format!("{node}: {e}"));
        match asked {
            Ok(topology) => return Ok(topology),
            Err(e) => errors.push(e),
        }
    }
    Err(format!(
        "no cluster node answered CLUSTER SHARDS: {}",
        errors.join("; ")
    ))
}

/// `CLUSTER SHARDS` (Redis 7.0+), or `CLUSTER SLOTS` where that subcommand
/// is unknown. `asked` is the host the connection went to: nodes that do not
/// know their own address announce an empty one, meaning "this node".
pub fn query_topology(con: &mut Connection, asked: &str, tls: bool) -> Result<Topology, String> {
    match redis::cmd("CLUSTER").arg("SHARDS").query::<Value>(con) {
        Ok(reply) => parse_shards(&reply, asked, tls)
            .ok_or_else(|| format!("CLUSTER SHARDS: unexpected reply {reply:?}")),
        Err(e)
            if e.to_string()
                .to_ascii_lowercase()
                .contains("unknown subcommand") =>
        {
            debug!("CLUSTER SHARDS unknown (Redis before 7.0): asking CLUSTER SLOTS");
            let reply = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Value>(con)
                .map_err(|e| format!("CLUSTER SLOTS: {e}"))?;
            parse_slots(&reply, asked)
                .ok_or_else(|| format!("CLUSTER SLOTS: unexpected reply {reply:?}"))
        }
        Err(e) => Err(format!("CLUSTER SHARDS: {e}")),
    }
}

/// `[shard...]`, each shard `{slots: [start, end, ...], nodes: [{id, port,
/// tls-port?, ip, endpoint, hostname?, role, health, ...}]}` (maps as flat
/// arrays in RESP2). Nodes not `online` are left out; a shard whose master is
/// not online keeps no slots (they are unserved until a replica takes over).
fn parse_shards(reply: &Value, asked: &str, tls: bool) -> Option<Topology> {
    let mut shards = Vec::new();
    for shard in as_items(reply)? {
        let fields = as_fields(shard)?;
        let slots = as_items(field(&fields, "slots")?)?
            .chunks(2)
            .map(|pair| match pair {
                [start, end] => Some((as_u16(start)?, as_u16(end)?)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let mut master = None;
        let mut replicas = Vec::new();
        for node in as_items(field(&fields, "nodes")?)? {
            let node = as_fields(node)?;
            let text = |name: &str| field(&node, name).and_then(as_text);
            if text("health").as_deref() != Some("online") {
                continue;
            }
            let port = match field(&node, "tls-port").filter(|_| tls) {
                Some(port) => as_u16(port)?,
                None => as_u16(field(&node, "port")?)?,
            };
            let host = match text("endpoint").filter(|e| !e.is_empty()) {
                Some(endpoint) if endpoint == "?" => continue,
                Some(endpoint) => endpoint,
                None => text("ip")
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or_else(|| asked.to_string()),
            };
            let addr = NodeAddr::new(host, port);
            match text("role").as_deref() {
                Some("master") => master = Some(addr),
                _ => replicas.push(addr),
            }
        }
        match master {
            Some(master) => shards.push(Shard {
                slots,
                master,
                replicas,
            }),
            None if !slots.is_empty() => {
                warn!("Redis Cluster: no online master for slots {slots:?}");
            }
            None => {}
        }
    }
    Some(Topology::new(shards))
}

/// `[[start, end, [host, port, id, ...], [replica host, port, id, ...]...]...]`.
fn parse_slots(reply: &Value, asked: &str) -> Option<Topology> {
    let mut shards: Vec<Shard> = Vec::new();
    for range in as_items(reply)? {
        let items = as_items(range)?;
        let [start, end, master, replicas @ ..] = items else {
            return None;
        };
        let range = (as_u16(start)?, as_u16(end)?);
        let node = |value: &Value| -> Option<Option<NodeAddr>> {
            let node = as_items(value)?;
            let host = as_text(node.first()?)?;
            let port = as_u16(node.get(1)?)?;
            Some(match host.as_str() {
                "?" => None,
                "" => Some(NodeAddr::new(asked, port)),
                _ => Some(NodeAddr::new(host, port)),
            })
        };
        let Some(master) = node(master)? else {
            continue;
        };
        let replicas: Vec<NodeAddr> = replicas
            .iter()
            .map(node)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        match shards.iter_mut().find(|shard| shard.master == master) {
            Some(shard) => shard.slots.push(range),
            None => shards.push(Shard {
                slots: vec![range],
                master,
                replicas,
            }),
        }
    }
    Some(Topology::new(shards))
}

fn as_items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// A map as RESP3 sends it, or as RESP2's flat `[name, value, ...]` array.
fn as_fields(value: &Value) -> Option<Vec<(&Value, &Value)>> {
    match value {
        Value::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k, v)).collect()),
        Value::Array(items) if items.len() % 2 == 0 => {
            Some(items.chunks(2).map(|pair| (&pair[0], &pair[1])).collect())
        }
        _ => None,
    }
}

fn field<'a>(fields: &[(&Value, &'a Value)], name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(key, _)| as_text(key).as_deref() == Some(name))
        .map(|(_, value)| *value)
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn as_u16(value: &Value) -> Option<u16> {
    match value {
        Value::Int(n) => u16::try_from(*n).ok(),
        other => as_text(other)?.parse().ok(),
    }
}

/// Where a MOVED or ASK reply points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot has a new owner for good: refresh the topology.
    Moved(NodeAddr),
    /// The slot is being migrated and this key is already at the target: ask
    /// it there once, after `ASKING`.
    Ask(NodeAddr),
}

impl Redirect {
    /// From an error's code and detail (`MOVED <slot> <host:port>`). `asked`
    /// is the host of the node that answered.
    pub fn from_error(code: Option<&str>, detail: Option<&str>, asked: &str) -> Option<Redirect> {
        let mut words = detail?.split_ascii_whitespace();
        let _slot = words.next()?;
        let node = NodeAddr::parse(words.next()?, asked)?;
        match code? {
            "MOVED" => Some(Redirect::Moved(node)),
            "ASK" => Some(Redirect::Ask(node)),
            _ => None,
        }
    }

    pub fn of(error: &redis::RedisError, asked: &str) -> Option<Redirect> {
        Redirect::from_error(error.code(), error.detail(), asked)
    }

    pub fn node(&self) -> &NodeAddr {
        match self {
            Redirect::Moved(node) | Redirect::Ask(node) => node,
        }
    }
}

/// Blocking connections to a cluster's masters, opened on demand, with the
/// topology they were routed by. Owned by one thread.
pub struct Nodes {
    config: RedisConfig,
    io_wait: Duration,
    topology: Topology,
    connections: HashMap<NodeAddr, Connection>,
    /// Loaded with `FUNCTION LOAD REPLACE` on every master a connection is
    /// opened to (history on).
    library: Option<String>,
}

impl Nodes {
    /// No connection yet; call [`Nodes::refresh`] first.
    pub fn new(config: RedisConfig, io_wait: Duration, library: Option<String>) -> Nodes {
        Nodes {
            config,
            io_wait,
            topology: Topology::default(),
            connections: HashMap::new(),
            library,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Asks the known masters, then the seeds, for the topology, and closes
    /// the connections to nodes that are no longer masters.
    pub fn refresh(&mut self) -> Result<(), String> {
        let mut candidates: Vec<NodeAddr> = self.topology.masters().cloned().collect();
        for seed in seeds(&self.config) {
            if !candidates.contains(&seed) {
                candidates.push(seed);
            }
        }
        let topology = discover(&self.config, &candidates, self.io_wait)?;
        self.connections
            .retain(|node, _| topology.masters().any(|master| master == node));
        self.topology = topology;
        Ok(())
    }

    /// The connection to `node`, opened (and the library loaded) if needed.
    pub fn connection(&mut self, node: &NodeAddr) -> Result<&mut Connection, String> {
        if !self.connections.contains_key(node) {
            let mut con = connect(&self.config, node, self.io_wait)?;
            // Reads work without the library; publishers need it.
            match self.library.as_deref().map(|l| load_library(&mut con, l)) {
                Some(Ok(())) => info!(node:% = node; "Redis function library ws_notify loaded"),
                Some(Err(e)) => warn!(node:% = node; "function library ws_notify not loaded: {e}"),
                None => {}
            }
            self.connections.insert(node.clone(), con);
        }
        self.connections
            .get_mut(node)
            .ok_or_else(|| format!("{node}: no connection"))
    }

    /// Forgets the connection to `node` (after an I/O error).
    pub fn drop_connection(&mut self, node: &NodeAddr) {
        self.connections.remove(node);
    }

    /// Opens a connection to every master that has none (loading the library
    /// there) and PINGs the others; the errors, one per master that failed.
    pub fn check_masters(&mut self) -> Vec<String> {
        let masters: Vec<NodeAddr> = self.topology.masters().cloned().collect();
        let mut errors = Vec::new();
        for master in masters {
            let pinged = self.connection(&master).and_then(|con| {
                redis::cmd("PING")
                    .query::<String>(con)
                    .map_err(|e| format!("{master}: PING: {e}"))
            });
            if let Err(e) = pinged {
                self.drop_connection(&master);
                errors.push(e);
            }
        }
        errors
    }

    /// Loads the function library on every master (a connection to each is
    /// opened if needed).
    pub fn load_library_everywhere(&mut self, library: &str) -> Result<(), String> {
        let masters: Vec<NodeAddr> = self.topology.masters().cloned().collect();
        for master in masters {
            let con = self.connection(&master)?;
            load_library(con, library).map_err(|e| format!("{master}: {e}"))?;
        }
        Ok(())
    }

    /// Runs `cmd` on the master of `key`'s slot. A MOVED reply refreshes the
    /// topology and is followed once; an ASK reply is followed once with
    /// `ASKING`. A broken connection is reopened once.
    pub fn query_routed<T: redis::FromRedisValue>(
        &mut self,
        key: &[u8],
        cmd: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        let owner = self.topology.master_for_key(key).cloned();
        let mut node = match owner {
            Some(node) => node,
            None => {
                self.refresh().map_err(routing_error)?;
                self.topology.master_for_key(key).cloned().ok_or_else(|| {
                    routing_error(format!("no master serves slot {}", key_slot(key)))
                })?
            }
        };
        let mut asking = false;
        let mut reopened = false;
        let mut redirected = false;
        loop {
            let con = self.connection(&node).map_err(routing_error)?;
            let result = if asking {
                redis::pipe()
                    .cmd("ASKING")
                    .ignore()
                    .add_command(cmd.clone())
                    .query::<(T,)>(con)
                    .map(|(value,)| value)
            } else {
                cmd.query::<T>(con)
            };
            match result {
                Err(e) if !redirected && Redirect::of(&e, &node.host).is_some() => {
                    redirected = true;
                    match Redirect::of(&e, &node.host) {
                        Some(Redirect::Moved(to)) => {
                            // The next commands go there too.
                            if let Err(error) = self.refresh() {
                                debug!("topology refresh after MOVED failed: {error}");
                            }
                            node = to;
                        }
                        Some(Redirect::Ask(to)) => {
                            asking = true;
                            node = to;
                        }
                        None => return Err(e),
                    }
                }
                Err(e) if !reopened && (e.is_io_error() || e.is_connection_dropped()) => {
                    reopened = true;
                    self.drop_connection(&node);
                }
                Err(e) => {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                        self.drop_connection(&node);
                    }
                    return Err(e);
                }
                Ok(value) => return Ok(value),
            }
        }
    }
}

fn routing_error(text: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "Redis Cluster", text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_the_cluster_specification() {
        // The specification's CRC16 check value, and CLUSTER KEYSLOT answers.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b""), 0);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Only the first {...}; an empty tag means the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"{}"), crc16_xmodem(b"{}") % SLOTS);
        assert_eq!(
            key_slot(b"no close {brace"),
            crc16_xmodem(b"no close {brace") % SLOTS
        );
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn node(fields: &[(&str, Value)]) -> Value {
        Value::Array(
            fields
                .iter()
                .flat_map(|(k, v)| [bulk(k), v.clone()])
                .collect(),
        )
    }

    #[test]
    fn cluster_shards_replies_become_a_topology() {
        let shard = |slots: &[i64], nodes: Vec<Value>| {
            Value::Array(vec![
                bulk("slots"),
                Value::Array(slots.iter().map(|s| Value::Int(*s)).collect()),
                bulk("nodes"),
                Value::Array(nodes),
            ])
        };
        let member = |port: i64, endpoint: &str, role: &str, health: &str| {
            node(&[
                ("id", bulk("x")),
                ("port", Value::Int(port)),
                ("tls-port", Value::Int(port + 1000)),
                ("ip", bulk("10.0.0.9")),
                ("endpoint", bulk(endpoint)),
                ("role", bulk(role)),
                ("replication-offset", Value::Int(5)),
                ("health", bulk(health)),
            ])
        };
        let reply = Value::Array(vec![
            shard(
                &[0, 5460, 10923, 10923],
                vec![
                    member(7000, "10.0.0.1", "master", "online"),
                    member(7003, "10.0.0.4", "replica", "online"),
                    member(7006, "10.0.0.7", "replica", "failed"),
                ],
            ),
            shard(&[5461, 10922], vec![member(7001, "", "master", "online")]),
            // Its master failed and no replica took over yet: unserved.
            shard(
                &[10924, 16383],
                vec![
                    member(7002, "10.0.0.3", "master", "failed"),
                    member(7005, "10.0.0.6", "replica", "online"),
                ],
            ),
        ]);
        let topology = parse_shards(&reply, "seed", false).expect("parsed");
        assert_eq!(
            topology.master_for_slot(0),
            Some(&NodeAddr::new("10.0.0.1", 7000))
        );
        assert_eq!(
            topology.master_for_slot(10923),
            Some(&NodeAddr::new("10.0.0.1", 7000))
        );
        // No endpoint: the ip.
        assert_eq!(
            topology.master_for_slot(5461),
            Some(&NodeAddr::new("10.0.0.9", 7001))
        );
        assert_eq!(topology.master_for_slot(10924), None);
        assert_eq!(topology.master_for_slot(16383), None);
        assert_eq!(topology.unserved_slots(), 16383 - 10924 + 1);
        assert_eq!(
            topology.shards()[0].replicas,
            vec![NodeAddr::new("10.0.0.4", 7003)]
        );
        assert_eq!(topology.masters().count(), 2);
        // With TLS, the tls-port.
        let tls = parse_shards(&reply, "seed", true).expect("parsed");
        assert_eq!(
            tls.master_for_slot(0),
            Some(&NodeAddr::new("10.0.0.1", 8000))
        );
        assert!(parse_shards(&bulk("nope"), "seed", false).is_none());
    }

    #[test]
    fn cluster_slots_replies_become_a_topology() {
        let addr =
            |host: &str, port: i64| Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                addr("", 7000),
                addr("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16000),
                addr("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Int(16001), Value::Int(16383), addr("", 7000)]),
        ]);
        let topology = parse_slots(&reply, "seed.example").expect("parsed");
        let first = NodeAddr::new("seed.example", 7000);
        assert_eq!(topology.master_for_slot(100), Some(&first));
        assert_eq!(topology.master_for_slot(16383), Some(&first));
        assert_eq!(
            topology.master_for_slot(8192),
            Some(&NodeAddr::new("10.0.0.2", 7001))
        );
        assert_eq!(topology.masters().count(), 2);
        assert_eq!(topology.shards()[0].slots, vec![(0, 8191), (16001, 16383)]);
        assert_eq!(topology.unserved_slots(), 0);
    }

    #[test]
    fn redirects_and_addresses() {
        assert_eq!(
            Redirect::from_error(Some("MOVED"), Some("3999 127.0.0.1:6381"), "seed"),
            Some(Redirect::Moved(NodeAddr::new("127.0.0.1", 6381)))
        );
        assert_eq!(
            Redirect::from_error(Some("ASK"), Some("3999 :6381"), "seed"),
            Some(Redirect::Ask(NodeAddr::new("seed", 6381)))
        );
        assert_eq!(
            Redirect::from_error(Some("MOVED"), Some("1 ::1:7000"), "seed"),
            Some(Redirect::Moved(NodeAddr::new("::1", 7000)))
        );
        assert_eq!(Redirect::from_error(Some("ERR"), Some("1 a:1"), "s"), None);
        assert_eq!(Redirect::from_error(Some("MOVED"), Some("1"), "s"), None);
        assert_eq!(NodeAddr::new("::1", 7000).to_string(), "[::1]:7000");
        assert_eq!(NodeAddr::new("redis-0", 6379).to_string(), "redis-0:6379");
    }
}
