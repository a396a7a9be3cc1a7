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
