//! A real Redis Cluster of child `redis-server` processes on free ports, made
//! with `redis-cli --cluster create`, for the sharded-mode tests
//! (tests/cluster.rs). Start-up, failover and slot migration each wait, with a
//! deadline, until every live node reports `cluster_state:ok` and all of them
//! agree on which master owns which slots.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{POLL, TempDir, free_port};

/// Slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;
/// How long start-up, a failover or a migration may take to settle.
const SETTLE: Duration = Duration::from_secs(30);
/// `cluster-node-timeout` of the test nodes: a killed master is marked failed
/// and replaced by its replica about this long after it died.
const NODE_TIMEOUT_MS: u64 = 1000;

/// One node's process and ports.
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
}

/// One slot range and the ports that serve it, as `CLUSTER SLOTS` reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master: u16,
    pub replicas: Vec<u16>,
}

/// A running cluster; every node is killed on drop. Nodes are named by their
/// index in `nodes` (the order they were created in: masters first).
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    /// `requirepass` (and `masterauth`) of every node, if any.
    pub password: Option<String>,
    dir: TempDir,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each and
    /// waits until the cluster is settled.
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        Self::start_with_password(masters, replicas_per_master, None)
    }

    /// Like [`RedisCluster::start`], every node requiring `password` (the
    /// default user's) from clients and from its replicas.
    pub fn start_with_password(
        masters: usize,
        replicas_per_master: usize,
        password: Option<&str>,
    ) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(masters, replicas_per_master, password) {
                Ok(cluster) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a Redis Cluster: {last_error}");
    }

    fn try_start(
        masters: usize,
        replicas_per_master: usize,
        password: Option<&str>,
    ) -> Result<RedisCluster, String> {
        let count = masters * (1 + replicas_per_master);
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(count),
            password: password.map(str::to_string),
            dir: TempDir::new("cluster"),
        };
        for _ in 0..count {
            let port = cluster_port();
            let mut node = ClusterNode { port, child: None };
            cluster.spawn(&mut node)?;
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            cluster.wait_ping(node.port)?;
        }
        let mut create = Command::new("redis-cli");
        if let Some(password) = password {
            create.args(["-a", password, "--no-auth-warning"]);
        }
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .arg("--cluster-replicas")
            .arg(replicas_per_master.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null());
        let out = create
            .output()
            .map_err(|e| format!("run redis-cli (is redis-tools installed?): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        cluster.wait_settled_with(replicas_per_master)?;
        Ok(cluster)
    }

    fn spawn(&self, node: &mut ClusterNode) -> Result<(), String> {
        let dir = self.dir.path.join(node.port.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password, "--masterauth", password]);
        }
        let child = command
            .arg("--port")
            .arg(node.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// The nodes' ports, by node index.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,...` of every node (for `REDIS_CLUSTER_NODES`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node on `port`.
    #[track_caller]
    pub fn node_on(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|node| node.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].child.is_some()
    }

    /// A new connection to `node`.
    #[track_caller]
    pub fn connection(&self, node: usize) -> redis::Connection {
        self.connect(self.nodes[node].port)
            .unwrap_or_else(|e| panic!("connect to node {node} ({}): {e}", self.nodes[node].port))
    }

    /// `CLUSTER SLOTS` as seen by a live node.
    #[track_caller]
    pub fn slots(&self) -> Vec<SlotRange> {
        let node = self.live_nodes().next().expect("a live node");
        self.slot_map(self.nodes[node].port)
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS: {e}"))
    }

    /// The index of the master that owns `slot`.
    #[track_caller]
    pub fn master_for_slot(&self, slot: u16) -> usize {
        let range = self
            .slots()
            .into_iter()
            .find(|range| (range.start..=range.end).contains(&slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"));
        self.node_on(range.master)
    }

    /// The master indexes, in slot order.
    pub fn masters(&self) -> Vec<usize> {
        let mut masters: Vec<usize> = self
            .slots()
            .iter()
            .map(|range| self.node_on(range.master))
            .collect();
        masters.dedup();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// The other masters, once every one of them sees `dead` as failed (its
    /// slots then have no online master in `CLUSTER SHARDS`).
    #[track_caller]
    pub fn masters_seen_alive(&self, dead: usize) -> Vec<usize> {
        let others: Vec<usize> = self.live_nodes().filter(|n| *n != dead).collect();
        let dead_port = format!(":{}@", self.nodes[dead].port);
        super::wait_until(SETTLE, "the others mark the dead node failed", || {
            others.iter().all(|n| {
                self.connect(self.nodes[*n].port)
                    .and_then(|mut con| {
                        redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut con)
                    })
                    .is_ok_and(|nodes| {
                        nodes.lines().any(|line| {
                            line.contains(&dead_port)
                                && line.contains("fail")
                                && !line.contains("fail?")
                        })
                    })
            })
        });
        others
    }

    /// The live replicas of `master`.
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let port = self.nodes[master].port;
        let mut replicas: Vec<usize> = self
            .slots()
            .iter()
            .filter(|range| range.master == port)
            .flat_map(|range| range.replicas.iter().map(|p| self.node_on(*p)))
            .collect();
        replicas.sort_unstable();
        replicas.dedup();
        replicas
    }

    /// `CLUSTER KEYSLOT key`, Redis's own answer.
    #[track_caller]
    pub fn keyslot(&self, key: &str) -> u16 {
        let node = self.live_nodes().next().expect("a live node");
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query::<u16>(&mut self.connection(node))
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }

    /// `SPUBLISH channel payload` on the master that owns the channel's slot;
    /// the number of shard subscribers that got it.
    #[track_caller]
    pub fn spublish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        let master = self.master_for_slot(self.keyslot(channel));
        redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(payload.as_ref())
            .query::<i64>(&mut self.connection(master))
            .unwrap_or_else(|e| panic!("SPUBLISH {channel}: {e}"))
    }

    /// SIGKILL `node` and reap it (the others notice after the node timeout).
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            // It may have exited already; either way it is reaped next.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed `node` again on its port and directory (its
    /// nodes.conf brings it back into the cluster) and waits until the
    /// cluster settles.
    #[track_caller]
    pub fn restart(&mut self, node: usize) {
        let mut revived = ClusterNode {
            port: self.nodes[node].port,
            child: None,
        };
        self.spawn(&mut revived)
            .and_then(|()| self.wait_ping(revived.port))
            .unwrap_or_else(|e| panic!("restart node {node}: {e}"));
        self.nodes[node].child = revived.child;
        self.wait_until_settled(|_| true);
    }

    /// `CLUSTER FAILOVER` on `replica` (its master must be up): the replica
    /// takes over its master's slots; waits until every node agrees.
    #[track_caller]
    pub fn failover(&self, replica: usize) {
        let answer = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query::<String>(&mut self.connection(replica));
        assert!(
            answer.is_ok(),
            "CLUSTER FAILOVER on node {replica}: {answer:?}"
        );
        let port = self.nodes[replica].port;
        self.wait_until_settled(|ranges| ranges.iter().any(|range| range.master == port));
    }

    /// Kills `master` and waits until one of its replicas has taken over its
    /// slots in every live node's view; returns that replica.
    #[track_caller]
    pub fn kill_and_wait_promotion(&mut self, master: usize) -> usize {
        let replicas = self.replicas_of(master);
        assert!(!replicas.is_empty(), "node {master} has no replica");
        let slots: Vec<(u16, u16)> = self
            .slots()
            .iter()
            .filter(|range| range.master == self.nodes[master].port)
            .map(|range| (range.start, range.end))
            .collect();
        self.kill(master);
        let ports: Vec<u16> = replicas.iter().map(|r| self.nodes[*r].port).collect();
        self.wait_until_settled(|ranges| {
            ranges
                .iter()
                .filter(|range| slots.contains(&(range.start, range.end)))
                .all(|range| ports.contains(&range.master))
        });
        let (start, _) = slots[0];
        self.master_for_slot(start)
    }

    /// Moves `slot` (and its keys) to the master `to` with the
    /// `CLUSTER SETSLOT` IMPORTING / MIGRATING / `MIGRATE` / NODE sequence, as
    /// `redis-cli --cluster reshard` does; waits until every node agrees.
    #[track_caller]
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.master_for_slot(slot);
        if from == to {
            return;
        }
        self.start_migration(slot, to);
        self.finish_migration(slot, from, to);
    }

    /// The first half of a migration: `slot` IMPORTING at `to`, MIGRATING at
    /// its owner, and every key of it moved to `to`. The owner still owns the
    /// slot and answers `ASK` for those keys.
    #[track_caller]
    pub fn start_migration(&self, slot: u16, to: usize) {
        let from = self.master_for_slot(slot);
        assert_ne!(from, to, "slot {slot} is already at node {to}");
        let mut source = self.connection(from);
        setslot(
            &mut self.connection(to),
            slot,
            "IMPORTING",
            &self.node_id(from),
        );
        setslot(&mut source, slot, "MIGRATING", &self.node_id(to));
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut source)
                .unwrap_or_else(|e| panic!("CLUSTER GETKEYSINSLOT {slot}: {e}"));
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg("")
                .arg(0)
                .arg(5000);
            if let Some(password) = &self.password {
                migrate.arg("AUTH").arg(password);
            }
            migrate
                .arg("KEYS")
                .arg(&keys)
                .query::<String>(&mut source)
                .unwrap_or_else(|e| panic!("MIGRATE {keys:?}: {e}"));
        }
    }

    /// The second half: `slot` assigned to `to` (the target first, then the
    /// source `from`, which then sunsubscribes the slot's shard channels, then
    /// everyone else); waits until every node agrees.
    #[track_caller]
    pub fn finish_migration(&self, slot: u16, from: usize, to: usize) {
        let to_id = self.node_id(to);
        setslot(&mut self.connection(to), slot, "NODE", &to_id);
        setslot(&mut self.connection(from), slot, "NODE", &to_id);
        for master in self.masters() {
            if master != from && master != to {
                setslot(&mut self.connection(master), slot, "NODE", &to_id);
            }
        }
        let port = self.nodes[to].port;
        self.wait_until_settled(|ranges| {
            ranges
                .iter()
                .any(|range| range.master == port && (range.start..=range.end).contains(&slot))
        });
    }

    /// `CLUSTER MYID` of `node`.
    #[track_caller]
    pub fn node_id(&self, node: usize) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query::<String>(&mut self.connection(node))
            .unwrap_or_else(|e| panic!("CLUSTER MYID on node {node}: {e}"))
    }

    fn live_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|n| self.nodes[*n].child.is_some())
    }

    /// Waits until every live node reports `cluster_state:ok`, all of them
    /// report the same masters for the same slots, every slot is served and
    /// `done` holds for that map.
    #[track_caller]
    pub fn wait_until_settled(&self, done: impl Fn(&[SlotRange]) -> bool) {
        if let Err(e) = self.settle(SETTLE, |ranges| done(ranges)) {
            panic!("{e}");
        }
    }

    fn wait_settled_with(&self, replicas_per_master: usize) -> Result<(), String> {
        self.settle(SETTLE, |ranges| {
            ranges
                .iter()
                .all(|range| range.replicas.len() == replicas_per_master)
        })
    }

    fn settle(&self, timeout: Duration, done: impl Fn(&[SlotRange]) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.agreed_map() {
                Ok(ranges) if done(&ranges) => return Ok(()),
                Ok(ranges) => format!("not there yet: {ranges:?}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the cluster did not settle within {timeout:?}: {last}"
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// The slot map every live node agrees on, with masters only compared
    /// (replica lists differ while a failed node is being forgotten), sorted.
    fn agreed_map(&self) -> Result<Vec<SlotRange>, String> {
        let mut agreed: Option<Vec<SlotRange>> = None;
        for node in self.live_nodes() {
            let port = self.nodes[node].port;
            let mut con = self
                .connect(port)
                .map_err(|e| format!("node {port}: {e}"))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut con)
                .map_err(|e| format!("CLUSTER INFO on {port}: {e}"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {port} not ok yet"));
            }
            let mut ranges = self.slot_map(port)?;
            ranges.sort();
            let served: u32 = ranges
                .iter()
                .map(|range| u32::from(range.end - range.start) + 1)
                .sum();
            if served != u32::from(CLUSTER_SLOTS) {
                return Err(format!("node {port} serves {served} slots: {ranges:?}"));
            }
            match &agreed {
                None => agreed = Some(ranges),
                Some(first) => {
                    let masters = |r: &[SlotRange]| -> Vec<(u16, u16, u16)> {
                        r.iter().map(|x| (x.start, x.end, x.master)).collect()
                    };
                    if masters(first) != masters(&ranges) {
                        return Err(format!(
                            "nodes disagree: {first:?} vs node {port}: {ranges:?}"
                        ));
                    }
                }
            }
        }
        agreed.ok_or_else(|| "no live node".to_string())
    }

    /// A connection to the node on `port` (with the password, if any).
    fn connect(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let auth = match &self.password {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/"))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        con.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(con)
    }

    fn wait_ping(&self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = self
                .connect(port)
                .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
            match pong {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("redis-server on {port} did not answer PING: {e}"));
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// `CLUSTER SLOTS` of the node on `port`: `[[start, end, [ip, port, id], replicas...]]`.
    fn slot_map(&self, port: u16) -> Result<Vec<SlotRange>, String> {
        let mut con = self
            .connect(port)
            .map_err(|e| format!("node {port}: {e}"))?;
        let reply: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut con)
            .map_err(|e| format!("CLUSTER SLOTS on {port}: {e}"))?;
        let int = |value: &redis::Value| match value {
            redis::Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let node_port = |value: &redis::Value| match value {
            redis::Value::Array(node) => node.get(1).and_then(int),
            _ => None,
        };
        reply
            .iter()
            .map(|range| {
                let redis::Value::Array(items) = range else {
                    return None;
                };
                Some(SlotRange {
                    start: int(items.first()?)?,
                    end: int(items.get(1)?)?,
                    master: node_port(items.get(2)?)?,
                    replicas: items[3..].iter().filter_map(node_port).collect(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("CLUSTER SLOTS on {port}: unexpected reply {reply:?}"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill(node);
        }
    }
}

/// `CLUSTER SETSLOT slot state node_id`.
#[track_caller]
fn setslot(con: &mut redis::Connection, slot: u16, state: &str, node_id: &str) {
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(node_id)
        .query::<String>(con)
        .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} {node_id}: {e}"));
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}
