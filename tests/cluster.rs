//! Redis Cluster with sharded pub/sub (`REDIS_SUBSCRIBE_MODE=sharded`): real
//! `redis-server` clusters started by `common::RedisCluster`.

mod common;

use common::*;

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
    use ws_notify::cluster::{self, NodeAddr};
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
