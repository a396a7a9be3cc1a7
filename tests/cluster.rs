//! Redis Cluster with sharded pub/sub (`REDIS_SUBSCRIBE_MODE=sharded`): real
//! `redis-server` clusters started by `common::RedisCluster`.

mod common;

use std::process::Command;

use common::procs::{Output, run};
use common::*;
use serde_json::Value;
use ws_notify::cluster::{self, NodeAddr};

const BIN: &str = env!("CARGO_BIN_EXE_ws-notify");

/// For each master (in `cluster.masters()` order), a user whose channel
/// `user_noti:<user>` hashes to one of its slots.
fn users_on_each_master(cluster: &RedisCluster) -> Vec<(String, usize)> {
    let slots = cluster.slots();
    let owner = |slot: u16| {
        let range = slots
            .iter()
            .find(|r| (r.start..=r.end).contains(&slot))
            .expect("every slot is served");
        cluster.node_on(range.master)
    };
    cluster
        .masters()
        .into_iter()
        .map(|master| {
            let user = (0..)
                .map(|i| format!("u{i}"))
                .find(|u| owner(cluster::key_slot(format!("user_noti:{u}").as_bytes())) == master)
                .expect("some user hashes to every master");
            (user, master)
        })
        .collect()
}

/// A master other than `than`.
fn other_master(cluster: &RedisCluster, than: usize) -> usize {
    cluster
        .masters()
        .into_iter()
        .find(|m| *m != than)
        .expect("another master")
}

/// A redis-rs connection that `SSUBSCRIBE`d to one shard channel.
struct ShardSubscriber {
    con: redis::Connection,
}

impl ShardSubscriber {
    #[track_caller]
    fn new(cluster: &RedisCluster, node: usize, channel: &str) -> ShardSubscriber {
        let mut con = cluster.connection(node);
        con.send_packed_command(&redis::cmd("SSUBSCRIBE").arg(channel).get_packed_command())
            .expect("send SSUBSCRIBE");
        let reply = con.recv_response().expect("SSUBSCRIBE reply");
        assert_eq!(push_kind(&reply), "ssubscribe", "{reply:?}");
        ShardSubscriber { con }
    }

    /// The payload of the next `smessage`.
    #[track_caller]
    fn next_message(&mut self) -> String {
        let reply = self.con.recv_response().expect("a shard message");
        assert_eq!(push_kind(&reply), "smessage", "{reply:?}");
        match reply {
            redis::Value::Array(items) => match &items[2] {
                redis::Value::BulkString(payload) => String::from_utf8_lossy(payload).into(),
                other => panic!("payload {other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}

fn push_kind(reply: &redis::Value) -> String {
    match reply {
        redis::Value::Array(items) | redis::Value::Push { data: items, .. } => {
            match items.first() {
                Some(redis::Value::BulkString(kind)) => String::from_utf8_lossy(kind).into(),
                _ => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// `ws-notify <args>` with only `env` (and PATH) set.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.args(args).envs(env.iter().copied());
    run("ws-notify publish", cmd, secs(20))
}

/// Whether `node` has the `ws_notify` function library.
fn has_library(cluster: &RedisCluster, node: usize) -> bool {
    redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("ws_notify")
        .query::<Vec<redis::Value>>(&mut cluster.connection(node))
        .is_ok_and(|libraries| !libraries.is_empty())
}

#[test]
fn the_harness_starts_a_cluster_and_moves_a_slot() {
    let cluster = RedisCluster::start(3, 0);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{:?}", cluster.slots());
    let slot = cluster.keyslot("user_noti:alice");
    let from = cluster.master_for_slot(slot);
    let to = masters
        .iter()
        .copied()
        .find(|m| *m != from)
        .expect("another master");
    let mut con = cluster.connection(from);
    redis::cmd("SET")
        .arg("user_noti:alice")
        .arg("kept")
        .query::<()>(&mut con)
        .expect("SET");
    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.master_for_slot(slot), to);
    let value: String = redis::cmd("GET")
        .arg("user_noti:alice")
        .query(&mut cluster.connection(to))
        .expect("GET at the new owner");
    assert_eq!(value, "kept");
    assert_eq!(cluster.spublish("user_noti:alice", "x"), 0);
}

/// The gateway's Redis settings for `REDIS_SUBSCRIBE_MODE=sharded` with these seeds.
fn sharded_config(seeds: &str) -> ws_notify::config::RedisConfig {
    let env = [
        ("JWT_SECRET_KEY", "unused"),
        ("REDIS_SUBSCRIBE_MODE", "sharded"),
        ("REDIS_CLUSTER_NODES", seeds),
    ];
    ws_notify::config::Config::from_lookup(|name| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    })
    .expect("sharded configuration")
    .redis
}

#[test]
fn slots_and_topology_agree_with_the_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let mut keys: Vec<String> = [
        "foo",
        "",
        "{user1000}.following",
        "a{b}c",
        "a{}b",
        "{{x}}",
        "user_noti:ü",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    keys.extend((0..500).map(|i| format!("user_noti:{i}-{}", random_hex(1))));
    for key in &keys {
        assert_eq!(
            cluster::key_slot(key.as_bytes()),
            cluster.keyslot(key),
            "slot of {key:?}"
        );
    }

    // The first seed is down: discovery asks the next.
    let dead = free_port();
    let config = sharded_config(&format!("127.0.0.1:{dead},{}", cluster.seeds()));
    let topology = cluster::discover(&config, &cluster::seeds(&config), secs(1))
        .expect("topology from the seeds");
    assert_eq!(topology.unserved_slots(), 0);
    assert_eq!(topology.masters().count(), 3);
    for range in cluster.slots() {
        let master = NodeAddr::new("127.0.0.1", range.master);
        for slot in [range.start, range.end] {
            assert_eq!(topology.master_for_slot(slot), Some(&master), "slot {slot}");
        }
    }
    let only_dead = sharded_config(&format!("127.0.0.1:{dead}"));
    let error = cluster::discover(&only_dead, &cluster::seeds(&only_dead), secs(1))
        .expect_err("no node answers");
    assert!(error.contains(&format!("127.0.0.1:{dead}")), "{error}");
}

#[test]
fn publish_in_sharded_mode_reaches_shard_subscribers_on_every_master() {
    let cluster = RedisCluster::start(3, 0);
    for (n, (user, master)) in users_on_each_master(&cluster).into_iter().enumerate() {
        let channel = format!("user_noti:{user}");
        let mut subscriber = ShardSubscriber::new(&cluster, master, &channel);
        // The only seed is another master: the CLI finds the owner itself.
        let other = other_master(&cluster, master);
        let seed = format!("127.0.0.1:{}", cluster.nodes[other].port);
        let payload = format!(r#"{{"n":{n}}}"#);
        let out = cli(
            &["publish", &user, "t", &payload],
            &[
                ("REDIS_SUBSCRIBE_MODE", "sharded"),
                ("REDIS_CLUSTER_NODES", &seed),
            ],
        );
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(out.stdout.trim(), "1", "one shard subscriber: {out:?}");
        assert_eq!(
            subscriber.next_message(),
            format!(r#"{{"type":"t","payload":{payload}}}"#)
        );
    }

    // No node answers: exit 1, naming the seed.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = cli(
        &["publish", "u0", "t"],
        &[
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            ("REDIS_CLUSTER_NODES", &dead),
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains(&dead), "{out:?}");
}

#[test]
fn routed_commands_follow_a_migrated_slot() {
    let cluster = RedisCluster::start(3, 0);
    let config = sharded_config(&cluster.seeds());
    let mut nodes = cluster::Nodes::new(config, secs(2), None);
    nodes.refresh().expect("topology");
    let (user, master) = users_on_each_master(&cluster).remove(0);
    let channel = format!("user_noti:{user}");
    let slot = cluster::key_slot(channel.as_bytes());
    let to = other_master(&cluster, master);
    let mut set = redis::cmd("SET");
    set.arg(&channel).arg("v");
    nodes
        .query_routed::<()>(channel.as_bytes(), &set)
        .expect("SET");

    cluster.migrate_slot(slot, to);
    // The topology held is stale: the old owner answers MOVED, which is followed.
    let mut get = redis::cmd("GET");
    get.arg(&channel);
    let value: String = nodes
        .query_routed(channel.as_bytes(), &get)
        .expect("GET after MOVED");
    assert_eq!(value, "v");
    let to_addr = NodeAddr::new("127.0.0.1", cluster.nodes[to].port);
    assert_eq!(
        nodes.topology().master_for_slot(slot),
        Some(&to_addr),
        "refreshed"
    );
}

#[test]
fn history_in_sharded_mode_spublishes_appends_and_reads_on_the_owning_master() {
    let cluster = RedisCluster::start(3, 0);
    let users = users_on_each_master(&cluster);
    let seeds = cluster.seeds();
    let env = [
        ("REDIS_SUBSCRIBE_MODE", "sharded"),
        ("REDIS_CLUSTER_NODES", seeds.as_str()),
        ("WS_HISTORY_SIZE", "5"),
    ];

    // The CLI finds no function, loads the library on every master, and
    // publishes with ws_notify_spublish on the owner of the user's slot.
    let mut ids = Vec::new();
    for (user, master) in &users {
        let channel = format!("user_noti:{user}");
        let mut subscriber = ShardSubscriber::new(&cluster, *master, &channel);
        let out = cli(&["publish", user, "first", "1"], &env);
        assert_eq!(out.code, Some(0), "{out:?}");
        let id = out.stdout.trim().to_string();
        assert_eq!(
            subscriber.next_message(),
            format!(r#"{{"id":"{id}","type":"first","payload":1}}"#)
        );
        let len: i64 = redis::cmd("XLEN")
            .arg(&channel)
            .query(&mut cluster.connection(*master))
            .expect("XLEN on the owner");
        assert_eq!(len, 1, "{channel} on node {master}");
        ids.push(id);
    }
    for master in cluster.masters() {
        assert!(
            has_library(&cluster, master),
            "node {master} has the library"
        );
    }

    // The gateway loads the library on every master at start...
    for master in cluster.masters() {
        redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query::<()>(&mut cluster.connection(master))
            .expect("FUNCTION FLUSH");
    }
    let gw = Gateway::start(cluster.nodes[0].port, &env);
    for master in cluster.masters() {
        wait_until(PROMPT, "the gateway loaded the library everywhere", || {
            has_library(&cluster, master)
        });
    }
    // ... and reads each user's stream on its master: a resume from the
    // first message gets the second.
    for ((user, master), first) in users.iter().zip(&ids) {
        let out = cli(&["publish", user, "second", "2"], &env);
        assert_eq!(out.code, Some(0), "{out:?}");
        let second = out.stdout.trim().to_string();
        let query = format!("/ws?token={}&since={first}", gw.token(user));
        let ws = ws_connect_with(gw.port, &query, &[]).expect("connect");
        let (mut ws, hello) = expect_connected(ws);
        assert_eq!(
            hello["recovery"]["complete"], true,
            "user on node {master}: {hello}"
        );
        assert_eq!(hello["position"], second.as_str(), "{hello}");
        let replayed: Value = recv_json(&mut ws, PROMPT);
        assert_eq!(replayed["id"], second.as_str(), "{replayed}");
        assert_eq!(replayed["type"], "second", "{replayed}");
    }
}

/// What the sharded reader relies on: when a subscribed channel's slot moves
/// away, Redis (7.0+) tells the subscriber with an unsolicited `sunsubscribe`.
#[test]
fn redis_unsubscribes_shard_subscribers_whose_slot_moved() {
    let cluster = RedisCluster::start(3, 0);
    let (user, master) = users_on_each_master(&cluster).remove(0);
    let channel = format!("user_noti:{user}");
    let mut subscriber = ShardSubscriber::new(&cluster, master, &channel);
    let to = other_master(&cluster, master);
    cluster.migrate_slot(cluster::key_slot(channel.as_bytes()), to);
    let reply = subscriber
        .con
        .recv_response()
        .expect("a push after the move");
    assert_eq!(push_kind(&reply), "sunsubscribe", "{reply:?}");
    // At the new owner, SPUBLISH reaches a new subscription.
    let mut moved = ShardSubscriber::new(&cluster, to, &channel);
    assert_eq!(cluster.spublish(&channel, "after"), 1);
    assert_eq!(moved.next_message(), "after");
}

#[test]
fn after_a_failover_discovery_and_publish_find_the_promoted_replica() {
    let mut cluster = RedisCluster::start(3, 1);
    let config = sharded_config(&cluster.seeds());
    let topology = cluster::discover(&config, &cluster::seeds(&config), secs(1)).expect("topology");
    assert_eq!(topology.masters().count(), 3);
    assert!(
        topology
            .shards()
            .iter()
            .all(|shard| shard.replicas.len() == 1),
        "{topology:?}"
    );

    let (user, master) = users_on_each_master(&cluster).remove(0);
    let channel = format!("user_noti:{user}");
    let promoted = cluster.kill_and_wait_promotion(master);
    assert_ne!(promoted, master);
    let mut subscriber = ShardSubscriber::new(&cluster, promoted, &channel);
    // The seeds include the dead master: it is skipped.
    let seeds = cluster.seeds();
    let out = cli(
        &["publish", &user, "t", "7"],
        &[
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            ("REDIS_CLUSTER_NODES", &seeds),
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(subscriber.next_message(), r#"{"type":"t","payload":7}"#);

    // CLUSTER FAILOVER the other way round once the old master is gone: a
    // replica of another shard takes over without loss.
    let (_, other) = users_on_each_master(&cluster)
        .into_iter()
        .find(|(_, m)| *m != promoted)
        .expect("another shard");
    let replica = cluster.replicas_of(other)[0];
    cluster.failover(replica);
    assert!(cluster.masters().contains(&replica));
}

#[test]
fn sharded_mode_uses_the_configured_password_on_every_node() {
    let cluster = RedisCluster::start_with_password(3, 0, Some("s3cret-pw"));
    let seeds = cluster.seeds();
    let users = users_on_each_master(&cluster);
    let env = |password: &'static str| {
        [
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            ("REDIS_CLUSTER_NODES", seeds.as_str()),
            ("REDIS_PASSWORD", password),
            ("WS_HISTORY_SIZE", "3"),
        ]
    };
    for (user, master) in &users {
        let channel = format!("user_noti:{user}");
        let mut subscriber = ShardSubscriber::new(&cluster, *master, &channel);
        let out = cli(&["publish", user, "t", "1"], &env("s3cret-pw"));
        assert_eq!(out.code, Some(0), "{out:?}");
        let id = out.stdout.trim();
        assert_eq!(
            subscriber.next_message(),
            format!(r#"{{"id":"{id}","type":"t","payload":1}}"#)
        );
    }
    for master in cluster.masters() {
        assert!(has_library(&cluster, master), "node {master}");
    }
    let out = cli(&["publish", "u0", "t", "1"], &env("bad-pw-7f3"));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        !out.stderr.contains("bad-pw-7f3"),
        "no password in errors: {out:?}"
    );
}

/// With a slot half-migrated (its keys at the target, the slot still the
/// source's), the source answers ASK: the history reader and `ws-notify
/// publish` follow it with ASKING, so resuming and publishing keep working
/// during a resharding.
#[test]
fn history_reads_and_publishing_follow_a_slot_in_migration() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let env = [
        ("REDIS_SUBSCRIBE_MODE", "sharded"),
        ("REDIS_CLUSTER_NODES", seeds.as_str()),
        ("WS_HISTORY_SIZE", "5"),
    ];
    let (user, from) = users_on_each_master(&cluster).remove(0);
    let to = other_master(&cluster, from);
    let slot = cluster::key_slot(format!("user_noti:{user}").as_bytes());
    let gw = Gateway::start(cluster.nodes[0].port, &env);
    let publish = |kind: &str| {
        let out = cli(&["publish", &user, kind, "1"], &env);
        assert_eq!(out.code, Some(0), "{out:?}");
        out.stdout.trim().to_string()
    };
    let resume = |since: &str, expected: &str| {
        let query = format!("/ws?token={}&since={since}", gw.token(&user));
        let ws = ws_connect_with(gw.port, &query, &[]).expect("connect");
        let (mut ws, hello) = expect_connected(ws);
        assert_eq!(hello["recovery"]["complete"], true, "{hello}");
        assert_eq!(hello["recovery"]["count"], 1, "{hello}");
        let replayed = recv_json(&mut ws, PROMPT);
        assert_eq!(replayed["id"], expected, "{replayed}");
    };
    let first = publish("first");
    let second = publish("second");

    cluster.start_migration(slot, to);
    resume(&first, &second);
    let third = publish("third");

    cluster.finish_migration(slot, from, to);
    resume(&second, &third);
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("user_noti:{user}"))
        .query(&mut cluster.connection(to))
        .expect("XLEN at the new owner");
    assert_eq!(len, 3);
}

// ---------------------------------------------------------------------------
// The gateway in sharded mode
// ---------------------------------------------------------------------------

/// A gateway in sharded mode on `cluster` (its seeds, the first node as
/// REDIS_HOST:REDIS_PORT, which sharded mode does not use), subscribed.
fn sharded_gateway(cluster: &RedisCluster, extra: &[(&str, &str)]) -> Gateway {
    let seeds = cluster.seeds();
    let mut env = vec![
        ("REDIS_SUBSCRIBE_MODE", "sharded"),
        ("REDIS_CLUSTER_NODES", seeds.as_str()),
        ("REDIS_PING_INTERVAL", "1s"),
        ("REDIS_RECONNECT_MAX", "500ms"),
    ];
    env.extend_from_slice(extra);
    let gw = Gateway::start(cluster.nodes[0].port, &env);
    gw.wait_redis_connected(secs(10));
    gw
}

/// Opens a client of `user` (its `connected` means the subscription is in
/// place), publishes with SPUBLISH and expects the message.
#[track_caller]
fn assert_delivered(cluster: &RedisCluster, gw: &Gateway, user: &str, n: u64) {
    let (mut ws, hello) = ws_open(gw.port, &gw.token(user));
    assert_eq!(hello["user_id"], user, "{hello}");
    let message = format!(r#"{{"type":"n","payload":{n}}}"#);
    assert_eq!(cluster.spublish(&format!("user_noti:{user}"), &message), 1);
    let got = recv_json(&mut ws, PROMPT);
    assert_eq!(got["payload"], n, "{got}");
}

#[test]
fn the_gateway_delivers_to_users_on_every_master() {
    let cluster = RedisCluster::start(3, 0);
    let gw = sharded_gateway(&cluster, &[]);
    let users = users_on_each_master(&cluster);
    for (n, (user, _)) in users.iter().enumerate() {
        assert_delivered(&cluster, &gw, user, n as u64);
    }
    let (code, health) = gw.health();
    assert_eq!(code, 200, "{health}");
    let nodes = health["redis"]["nodes"]
        .as_array()
        .expect("redis.nodes")
        .clone();
    assert_eq!(nodes.len(), 3, "{health}");
    for node in &nodes {
        assert_eq!(node["status"], "connected", "{health}");
    }
    let text = gw.metrics_text();
    for master in cluster.masters() {
        let node = format!("127.0.0.1:{}", cluster.nodes[master].port);
        let connected = format!(r#"ws_notify_redis_node_connected{{node="{node}"}}"#);
        assert_eq!(metric_value(&text, &connected), Some(1.0), "{text}");
    }
}

/// A subscribed user's slot moves to another master while a publisher runs:
/// Redis sunsubscribes the gateway, which subscribes at the new owner; what
/// is published after that arrives.
#[test]
fn the_gateway_follows_a_slot_migration() {
    let cluster = RedisCluster::start(3, 0);
    let gw = sharded_gateway(&cluster, &[]);
    let (user, from) = users_on_each_master(&cluster).remove(0);
    let channel = format!("user_noti:{user}");
    let to = other_master(&cluster, from);
    let (mut ws, _) = ws_open(gw.port, &gw.token(&user));
    assert_eq!(cluster.spublish(&channel, r#"{"type":"n","payload":0}"#), 1);
    assert_eq!(recv_json(&mut ws, PROMPT)["payload"], 0);

    cluster.migrate_slot(cluster::key_slot(channel.as_bytes()), to);
    gw.wait_metric_at_least(
        r#"ws_notify_redis_resubscribes_total{reason="migration"}"#,
        1.0,
    );
    // Subscribed again at the new owner: SPUBLISH there reaches the gateway.
    let mut n = 1;
    wait_until(PROMPT, "the gateway subscribed at the new owner", || {
        let message = format!(r#"{{"type":"n","payload":{n}}}"#);
        n += 1;
        cluster.spublish(&channel, &message) == 1
    });
    let got = recv_json(&mut ws, PROMPT);
    assert_eq!(got["payload"], n - 1, "{got}");
    gw.wait_redis_connected(PROMPT);
    let node = format!("127.0.0.1:{}", cluster.nodes[to].port);
    let held = format!(r#"ws_notify_redis_subscriptions{{mode="sharded",node="{node}"}}"#);
    assert_eq!(gw.metric(&held), 1.0);
    // A new client of a user on the migrated slot is subscribed there too.
    assert_delivered(&cluster, &gw, &user, 99);
}

/// A master dies; its replica is promoted: the users on it are subscribed at
/// the new master and receive the next message; /health is degraded while
/// the master's link is down and healthy again after.
#[test]
fn the_gateway_follows_a_failover() {
    let mut cluster = RedisCluster::start(3, 1);
    let gw = sharded_gateway(&cluster, &[]);
    let users = users_on_each_master(&cluster);
    let (user, master) = users[0].clone();
    let channel = format!("user_noti:{user}");
    let (mut ws, _) = ws_open(gw.port, &gw.token(&user));
    assert_eq!(cluster.spublish(&channel, r#"{"type":"n","payload":0}"#), 1);
    assert_eq!(recv_json(&mut ws, PROMPT)["payload"], 0);

    let promoted = cluster.kill_and_wait_promotion(master);
    let mut n = 1;
    wait_until(
        secs(15),
        "the gateway subscribed at the promoted replica",
        || {
            let message = format!(r#"{{"type":"n","payload":{n}}}"#);
            n += 1;
            cluster.spublish(&channel, &message) == 1
        },
    );
    let got = recv_json(&mut ws, PROMPT);
    assert_eq!(got["payload"], n - 1, "{got}");
    gw.wait_redis_connected(secs(10));
    let (_, health) = gw.health();
    let promoted = format!("127.0.0.1:{}", cluster.nodes[promoted].port);
    let nodes = health["redis"]["nodes"].as_array().expect("nodes").clone();
    assert!(
        nodes
            .iter()
            .any(|n| n["node"] == promoted.as_str() && n["status"] == "connected"),
        "{health}"
    );
    assert_eq!(nodes.len(), 3, "the dead master is forgotten: {health}");
    // Users on the other masters were not disturbed.
    for (user, _) in &users[1..] {
        assert_delivered(&cluster, &gw, user, 7);
    }
}

/// A master is down when the gateway starts: /health says degraded (503,
/// with the node's state), and healthy once the master is back; its users
/// are served then.
#[test]
fn a_master_down_at_start_degrades_then_heals() {
    let mut cluster = RedisCluster::start(3, 0);
    let (user, master) = users_on_each_master(&cluster).remove(0);
    cluster.kill(master);
    // The others notice (cluster-node-timeout) and the cluster goes down.
    let alive = cluster.masters_seen_alive(master);
    let seeds = alive
        .iter()
        .map(|n| format!("127.0.0.1:{}", cluster.nodes[*n].port))
        .collect::<Vec<_>>()
        .join(",");
    let gw = Gateway::start(
        cluster.nodes[alive[0]].port,
        &[
            ("REDIS_SUBSCRIBE_MODE", "sharded"),
            ("REDIS_CLUSTER_NODES", &seeds),
            ("REDIS_PING_INTERVAL", "1s"),
            ("REDIS_RECONNECT_MAX", "500ms"),
        ],
    );
    wait_until(PROMPT, "/health reports two masters connected", || {
        let (_, health) = gw.health();
        health["redis"]["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().filter(|n| n["status"] == "connected").count() == 2)
    });
    let (code, health) = gw.health();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");

    cluster.restart(master);
    gw.wait_redis_connected(secs(15));
    assert_delivered(&cluster, &gw, &user, 1);
}

/// History on, a publisher running through a slot migration: messages
/// published after the move arrive live, and a resume from the first message
/// recovers every one of them (`complete:true`), wherever the stream was when
/// each was appended.
#[test]
fn a_migration_under_a_running_publisher_loses_nothing_with_history() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cluster = RedisCluster::start(3, 0);
    let gw = sharded_gateway(&cluster, &[("WS_HISTORY_SIZE", "1000")]);
    for master in cluster.masters() {
        wait_until(PROMPT, "the library is loaded", || {
            has_library(&cluster, master)
        });
    }
    let (user, from) = users_on_each_master(&cluster).remove(0);
    let channel = format!("user_noti:{user}");
    let to = other_master(&cluster, from);
    let (mut ws, _) = ws_open(gw.port, &gw.token(&user));

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = Arc::clone(&stop);
        let mut nodes = cluster::Nodes::new(sharded_config(&cluster.seeds()), secs(2), None);
        let channel = channel.clone();
        std::thread::spawn(move || {
            nodes.refresh().expect("topology");
            let mut ids = Vec::new();
            for n in 0.. {
                if stop.load(Ordering::Acquire) && n >= 5 {
                    break;
                }
                let mut fcall = redis::cmd("FCALL");
                fcall
                    .arg("ws_notify_spublish")
                    .arg(1)
                    .arg(&channel)
                    .arg(format!(r#"{{"type":"n","payload":{n}}}"#));
                let id: String = nodes
                    .query_routed(channel.as_bytes(), &fcall)
                    .unwrap_or_else(|e| panic!("FCALL #{n}: {e}"));
                ids.push(id);
                std::thread::sleep(ms(5));
            }
            ids
        })
    };
    std::thread::sleep(ms(100));
    cluster.migrate_slot(cluster::key_slot(channel.as_bytes()), to);
    gw.wait_metric_at_least(
        r#"ws_notify_redis_resubscribes_total{reason="migration"}"#,
        1.0,
    );
    gw.wait_redis_connected(PROMPT);
    std::thread::sleep(ms(100));
    stop.store(true, Ordering::Release);
    let published = publisher.join().expect("publisher");

    // The last message was published after the gateway subscribed at the new
    // owner: it arrives live.
    let last = published.last().expect("published").clone();
    let mut live = Vec::new();
    while live.last() != Some(&last) {
        let msg = recv_json(&mut ws, PROMPT);
        live.push(msg["id"].as_str().expect("id").to_string());
    }
    // Everything after the first message is in the history, in order.
    let query = format!("/ws?token={}&since={}", gw.token(&user), published[0]);
    let (mut resumed, hello) =
        expect_connected(ws_connect_with(gw.port, &query, &[]).expect("connect"));
    assert_eq!(hello["recovery"]["complete"], true, "{hello}");
    assert_eq!(hello["recovery"]["count"], published.len() - 1, "{hello}");
    for id in &published[1..] {
        assert_eq!(recv_json(&mut resumed, PROMPT)["id"], id.as_str());
    }
    eprintln!(
        "{} published during the move, {} of them live",
        published.len(),
        live.len()
    );
}
