//! The reader's sharded mode (`REDIS_SUBSCRIBE_MODE=sharded`, Redis Cluster
//! 7.0+): one pub/sub link per master, all in the reader thread's `Poll`.
//!
//! ```text
//!  topology (cluster::discover from the masters known, then the seeds)
//!      -> a link per master (Token(FIRST_NODE_TOKEN + index), index stable)
//!  the loop's Subscribe(user) -> SSUBSCRIBE at the master of the channel's slot,
//!      one command per slot (a command may only name channels of one slot)
//!  ssubscribe confirmed on that link -> Confirmations::push(user)
//!  sunsubscribe Redis sent by itself (the slot moved) -> the user is unplaced,
//!      the topology refreshed, the user subscribed at the new owner
//!  a link lost -> its users unplaced, the topology refreshed (a replica may
//!      have been promoted), a link to each master (re)opened, users subscribed
//! ```
//!
//! A session ends only when the thread stops, or when no node answers for the
//! topology at its start; a failing link is the link's own affair, so the
//! other masters' users keep receiving. `RedisStatus::is_subscribed` holds
//! while every master's link is up and answered its first ping, and no wanted
//! channel waits for a new home.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::cluster::{self, NodeAddr, Topology};
use crate::redis_status::NodeHealth;

/// The first poll token of a node link (0 and 1 are `LINK_TOKEN`, `CHANGES_TOKEN`).
const FIRST_NODE_TOKEN: usize = 2;
/// How long a topology refresh may wait on one node.
const REFRESH_WAIT: Duration = Duration::from_secs(1);
/// After a failed refresh, the next one waits this long.
const REFRESH_RETRY: Duration = Duration::from_millis(500);

/// One user's subscription: its channel's state (as in channel mode) and the
/// master link it is placed on.
struct Place {
    /// The node link its SSUBSCRIBE went to; None while it needs one.
    node: Option<usize>,
    channel: UserChannel,
}

impl Place {
    /// Forgets the link; true when the subscription had been confirmed.
    fn unplace(&mut self) -> bool {
        self.node = None;
        self.channel.link_gone()
    }
}

/// A master and its link.
struct Node {
    addr: NodeAddr,
    name: String,
    target: Target,
    state: NodeState,
    /// Confirmed subscriptions on this link.
    subscriptions: u64,
    ping: Option<Duration>,
}

enum NodeState {
    /// Connect again at `retry_at`.
    Down { retry_at: Instant, attempt: u32 },
    Up {
        link: Link,
        /// The first pong (after the subscriptions sent at connect) came.
        ready: bool,
        connect_deadline: Instant,
        read_pending: bool,
        last_frame: Instant,
    },
}

/// The state of a sharded session.
struct Shards {
    topology: Topology,
    /// Index = poll token - FIRST_NODE_TOKEN; removed masters leave a None.
    nodes: Vec<Option<Node>>,
    users: HashMap<Box<str>, Place>,
    confirmed: u64,
    /// Users with no link (their master's link is down or unknown).
    unplaced: usize,
    /// A link came up or the topology changed: look for homes for the
    /// unplaced (not every turn: that is a walk over every user).
    placement_due: bool,
    /// When to ask for the topology again.
    refresh_at: Option<Instant>,
    /// The node to ask first: the one that said a slot moved knows it.
    ask_first: Option<NodeAddr>,
    /// Per-node figures changed since they were last published.
    nodes_dirty: bool,
}

/// SSUBSCRIBE / SUNSUBSCRIBE commands being built, grouped by link and slot.
#[derive(Default)]
struct SlotBatch {
    kind: Option<SubscriptionKind>,
    groups: BTreeMap<(usize, u16), Vec<String>>,
}

impl SlotBatch {
    fn add(
        &mut self,
        nodes: &mut [Option<Node>],
        status: &RedisStatus,
        kind: SubscriptionKind,
        node: usize,
        channel: String,
    ) {
        if self.kind.is_some_and(|k| k != kind) {
            self.finish(nodes, status);
        }
        self.kind = Some(kind);
        let slot = cluster::key_slot(channel.as_bytes());
        self.groups.entry((node, slot)).or_default().push(channel);
    }

    fn finish(&mut self, nodes: &mut [Option<Node>], status: &RedisStatus) {
        let Some(kind) = self.kind.take() else {
            return;
        };
        for ((node, _slot), channels) in std::mem::take(&mut self.groups) {
            let Some(Node {
                state: NodeState::Up { link, .. },
                ..
            }) = nodes.get_mut(node).and_then(Option::as_mut)
            else {
                continue;
            };
            for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
                let mut cmd = redis::cmd(kind.command());
                for channel in chunk {
                    cmd.arg(channel.as_str());
                }
                link.command(&cmd, Command::Subscription(kind), chunk.len());
                match kind {
                    SubscriptionKind::Sunsubscribe => status.count_unsubscribes(chunk.len() as u64),
                    _ => status.count_subscribes(chunk.len() as u64),
                }
            }
        }
    }
}

/// Runs a sharded session (see the module doc).
pub(super) fn session(reader: &mut ReaderThread) -> SessionEnd {
    if let Subscription::Lost { attempts, .. } = &mut reader.subscription {
        *attempts += 1;
    }
    let mut shards = Shards {
        topology: Topology::default(),
        nodes: Vec::new(),
        users: HashMap::new(),
        confirmed: 0,
        unplaced: 0,
        refresh_at: None,
        ask_first: None,
        placement_due: true,
        nodes_dirty: true,
    };
    // The wanted set survives only as the loop's changes: everything the
    // loop still wants after a session ends is asked for again below (the
    // loop re-requests nothing, so keep what the last session knew).
    if let Some(wanted) = reader.wanted.as_mut() {
        for (user, mut channel) in wanted.users.drain() {
            if channel.wanted {
                channel.link_gone();
                shards.users.insert(
                    user,
                    Place {
                        node: None,
                        channel,
                    },
                );
            }
        }
        wanted.confirmed = 0;
    }
    shards.unplaced = shards.users.len();
    if let Err(e) = shards.refresh(reader) {
        shards.keep_wanted(reader);
        return SessionEnd::ConnectFailed(e);
    }
    let end = shards.drive(reader);
    for node in shards.nodes.iter_mut().flatten() {
        if let NodeState::Up { link, .. } = &mut node.state {
            link.deregister(reader.poll.registry());
        }
    }
    shards.keep_wanted(reader);
    reader.status.set_subscriptions(0);
    reader.status.set_nodes(Vec::new());
    end
}

impl Shards {
    /// Hands the wanted set back to the reader's `Wanted` for the next session.
    fn keep_wanted(&mut self, reader: &mut ReaderThread) {
        if let Some(wanted) = reader.wanted.as_mut() {
            wanted.users = self
                .users
                .drain()
                .filter(|(_, place)| place.channel.wanted)
                .map(|(user, mut place)| {
                    place.channel.link_gone();
                    (user, place.channel)
                })
                .collect();
            wanted.confirmed = 0;
        }
    }

    /// Asks for the topology; adds a link for each new master and drops the
    /// links of nodes that are no longer masters (their users are unplaced).
    fn refresh(&mut self, reader: &ReaderThread) -> Result<(), String> {
        let mut candidates: Vec<NodeAddr> = self.ask_first.take().into_iter().collect();
        for master in self.topology.masters() {
            if !candidates.contains(master) {
                candidates.push(master.clone());
            }
        }
        for seed in cluster::seeds(&reader.config) {
            if !candidates.contains(&seed) {
                candidates.push(seed);
            }
        }
        let topology = match cluster::discover(&reader.config, &candidates, REFRESH_WAIT) {
            Ok(topology) => topology,
            Err(e) => {
                self.refresh_at = Some(Instant::now() + REFRESH_RETRY);
                return Err(e);
            }
        };
        // Slots without an online master (a failed master whose replica is
        // not promoted yet): ask again soon.
        self.refresh_at = (topology.unserved_slots() > 0).then(|| Instant::now() + REFRESH_RETRY);
        for index in 0..self.nodes.len() {
            let gone = self.nodes[index]
                .as_ref()
                .is_some_and(|node| !topology.masters().any(|m| *m == node.addr));
            if gone {
                self.unplace_node(index, &reader.status);
                if let Some(mut node) = self.nodes[index].take() {
                    if let NodeState::Up { link, .. } = &mut node.state {
                        link.deregister(reader.poll.registry());
                    }
                    info!(node = node.name.as_str(); "Redis Cluster: no longer a master");
                }
            }
        }
        for master in topology.masters() {
            if self.index_of(master).is_some() {
                continue;
            }
            let target = Target::at(&reader.config, &master.host, master.port)
                .map_err(|e| format!("{master}: {e}"))?;
            let node = Node {
                name: master.to_string(),
                addr: master.clone(),
                target,
                state: NodeState::Down {
                    retry_at: Instant::now(),
                    attempt: 0,
                },
                subscriptions: 0,
                ping: None,
            };
            match self.nodes.iter().position(Option::is_none) {
                Some(free) => self.nodes[free] = Some(node),
                None => self.nodes.push(Some(node)),
            }
        }
        self.topology = topology;
        self.nodes_dirty = true;
        self.placement_due = true;
        Ok(())
    }

    fn index_of(&self, addr: &NodeAddr) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.as_ref().is_some_and(|n| n.addr == *addr))
    }

    fn name_of(&self, index: usize) -> &str {
        self.nodes
            .get(index)
            .and_then(Option::as_ref)
            .map_or("?", |node| node.name.as_str())
    }

    /// Every user placed on `index` needs a new subscription (counted as a
    /// resubscription after a reconnect).
    fn unplace_node(&mut self, index: usize, status: &RedisStatus) {
        let before = self.unplaced;
        // Users unsubscribed and only waiting for the reply are done.
        self.users
            .retain(|_, place| place.channel.wanted || place.node != Some(index));
        for place in self.users.values_mut() {
            if place.node == Some(index) {
                self.unplaced += 1;
                self.confirmed -= u64::from(place.unplace());
            }
        }
        if let Some(node) = self.nodes.get_mut(index).and_then(Option::as_mut) {
            node.subscriptions = 0;
        }
        status.count_resubscribes_after_reconnect((self.unplaced - before) as u64);
        status.set_subscriptions(self.confirmed);
        self.nodes_dirty = true;
    }

    /// The link index that should hold `user`'s channel, if its link is up.
    fn home_of(&self, channel: &str) -> Option<usize> {
        let master = self.topology.master_for_key(channel.as_bytes())?;
        let index = self.index_of(master)?;
        match self.nodes[index].as_ref()?.state {
            NodeState::Up { .. } => Some(index),
            NodeState::Down { .. } => None,
        }
    }

    /// Subscribes every unplaced user whose master's link is up.
    fn place_unplaced(&mut self, reader: &ReaderThread, batch: &mut SlotBatch) {
        self.placement_due = false;
        if self.unplaced == 0 {
            return;
        }
        let prefix = reader.config.channel_prefix.as_str();
        let mut channel = String::new();
        let mut placed = Vec::new();
        for (user, place) in &self.users {
            if place.node.is_some() {
                continue;
            }
            channel.clear();
            channel.push_str(prefix);
            channel.push_str(user);
            if let Some(index) = self.home_of(&channel) {
                placed.push((user.clone(), index, channel.clone()));
            }
        }
        for (user, index, channel) in placed {
            if let Some(place) = self.users.get_mut(&user) {
                place.node = Some(index);
                place.channel.sent();
                self.unplaced -= 1;
            }
            batch.add(
                &mut self.nodes,
                &reader.status,
                SubscriptionKind::Ssubscribe,
                index,
                channel,
            );
        }
    }

    /// Applies the loop's changes in order (runs of one kind batched by link
    /// and slot, as in channel mode).
    fn apply_changes(&mut self, reader: &mut ReaderThread) {
        let Some(wanted) = reader.wanted.as_mut() else {
            return;
        };
        wanted.taken.clear();
        wanted.changes.take(&mut wanted.taken);
        let taken = std::mem::take(&mut wanted.taken);
        let prefix = reader.config.channel_prefix.clone();
        let mut batch = SlotBatch::default();
        for change in &taken {
            match change {
                Change::Subscribe(user, request) => {
                    if !self.users.contains_key(user) {
                        let channel = UserChannel::new(*request);
                        self.users.insert(
                            user.clone(),
                            Place {
                                node: None,
                                channel,
                            },
                        );
                        self.unplaced += 1;
                    }
                    let Some(place) = self.users.get_mut(user) else {
                        continue;
                    };
                    match place.channel.subscribe(*request) {
                        SubscribeStep::ConfirmNow => {
                            if let Some(wanted) = reader.wanted.as_ref() {
                                wanted.confirmations.push(user, *request);
                            }
                        }
                        SubscribeStep::AwaitReply => {}
                        // A new user, or one whose SUNSUBSCRIBE is in flight
                        // on `node` (subscribed again there: a moved slot is
                        // followed like any other).
                        SubscribeStep::Send => {
                            let channel = format!("{prefix}{user}");
                            let node = place.node.or_else(|| {
                                let home = self.home_of(&channel)?;
                                self.unplaced -= 1;
                                Some(home)
                            });
                            let Some(place) = self.users.get_mut(user) else {
                                continue;
                            };
                            place.node = node;
                            if let Some(index) = node {
                                place.channel.sent();
                                batch.add(
                                    &mut self.nodes,
                                    &reader.status,
                                    SubscriptionKind::Ssubscribe,
                                    index,
                                    channel,
                                );
                            }
                        }
                    }
                }
                Change::Unsubscribe(user) => {
                    let Some(place) = self.users.get_mut(user) else {
                        continue;
                    };
                    let Some(was_confirmed) = place.channel.unsubscribe() else {
                        continue;
                    };
                    let Some(index) = place.node else {
                        self.unplaced -= 1;
                        self.users.remove(user);
                        continue;
                    };
                    if was_confirmed {
                        self.confirmed -= 1;
                        if let Some(node) = self.nodes[index].as_mut() {
                            node.subscriptions = node.subscriptions.saturating_sub(1);
                        }
                    }
                    place.channel.sent();
                    batch.add(
                        &mut self.nodes,
                        &reader.status,
                        SubscriptionKind::Sunsubscribe,
                        index,
                        format!("{prefix}{user}"),
                    );
                }
            }
        }
        batch.finish(&mut self.nodes, &reader.status);
        if let Some(wanted) = reader.wanted.as_mut() {
            wanted.taken = taken;
        }
        reader.status.set_subscriptions(self.confirmed);
        self.nodes_dirty = true;
    }

    /// A link failed: its users wait for a new subscription, the topology is
    /// refreshed (a failover?) and the link retried with backoff.
    fn link_lost(&mut self, reader: &mut ReaderThread, index: usize, error: String) {
        let error = scrub(error, reader.config.password.as_deref());
        let Some(node) = self.nodes[index].as_mut() else {
            return;
        };
        let attempt = match &mut node.state {
            NodeState::Up { link, ready, .. } => {
                link.deregister(reader.poll.registry());
                u32::from(!*ready)
            }
            NodeState::Down { attempt, .. } => attempt.saturating_add(1),
        };
        let delay = reader
            .jitter
            .delay(backoff_cap(attempt, reader.config.reconnect_max));
        node.state = NodeState::Down {
            retry_at: Instant::now() + delay,
            attempt,
        };
        node.ping = None;
        if let Some(suppressed) = reader.warn_connection.check(Instant::now()) {
            warn!(
                node = node.name.as_str(),
                error:% = error,
                retry_in_ms = delay.as_millis() as u64,
                suppressed;
                "Redis Cluster node unavailable; reconnecting"
            );
        }
        reader.status.set_error(format!("{}: {error}", node.name));
        // Starts the outage clock: "re-subscribed" is logged and counted once
        // every master's link is back.
        reader.lost_subscription();
        self.unplace_node(index, &reader.status);
        self.refresh_at = Some(Instant::now());
    }

    /// Connects the link of `index` (bounded by `io_wait`) and sends its
    /// users' SSUBSCRIBEs and a PING.
    fn connect(&mut self, reader: &mut ReaderThread, index: usize) {
        let Some(node) = self.nodes[index].as_mut() else {
            return;
        };
        let NodeState::Down { attempt, .. } = node.state else {
            return;
        };
        let connect_deadline = Instant::now() + reader.io_wait;
        let token = Token(FIRST_NODE_TOKEN + index);
        match Link::connect(
            &node.target,
            reader.poll.registry(),
            token,
            connect_deadline,
        ) {
            Ok(link) => {
                node.state = NodeState::Up {
                    link,
                    ready: false,
                    connect_deadline,
                    read_pending: true,
                    last_frame: Instant::now(),
                };
                let mut batch = SlotBatch::default();
                self.place_unplaced(reader, &mut batch);
                batch.finish(&mut self.nodes, &reader.status);
                if let Some(Node {
                    state: NodeState::Up { link, .. },
                    ..
                }) = self.nodes[index].as_mut()
                {
                    link.ping();
                }
                self.nodes_dirty = true;
            }
            Err(e) => {
                let error = reader.describe(&e);
                reader.status.count_connect_failure();
                if let Some(node) = self.nodes[index].as_mut() {
                    node.state = NodeState::Down {
                        retry_at: Instant::now(),
                        attempt,
                    };
                }
                self.link_lost(reader, index, error);
            }
        }
    }

    /// Every slot has a master, every master's link answered its first ping
    /// and no user waits for a home.
    fn all_ready(&self) -> bool {
        self.unplaced == 0
            && self.topology.unserved_slots() == 0
            && self
                .nodes
                .iter()
                .flatten()
                .all(|node| matches!(node.state, NodeState::Up { ready: true, .. }))
    }

    /// Publishes the per-node figures for `/health` and `/metrics`.
    fn publish_nodes(&mut self, status: &RedisStatus) {
        if !self.nodes_dirty {
            return;
        }
        self.nodes_dirty = false;
        let nodes = self
            .nodes
            .iter()
            .flatten()
            .map(|node| NodeHealth {
                node: node.name.clone(),
                connected: matches!(node.state, NodeState::Up { ready: true, .. }),
                subscriptions: node.subscriptions,
                ping: node.ping,
            })
            .collect();
        status.set_nodes(nodes);
    }

    /// The session's loop; ends only when the thread stops or the loop is gone.
    fn drive(&mut self, reader: &mut ReaderThread) -> SessionEnd {
        let mut changes_pending = true;
        loop {
            let now = Instant::now();
            if self.refresh_at.is_some_and(|at| now >= at)
                && let Err(e) = self.refresh(reader)
            {
                debug!("Redis Cluster topology refresh failed: {e}");
            }
            for index in 0..self.nodes.len() {
                let due = matches!(
                    self.nodes[index].as_ref().map(|n| &n.state),
                    Some(NodeState::Down { retry_at, .. }) if *retry_at <= now
                );
                if due {
                    self.connect(reader, index);
                }
            }
            if changes_pending {
                changes_pending = false;
                self.apply_changes(reader);
            }
            if self.placement_due {
                let mut batch = SlotBatch::default();
                self.place_unplaced(reader, &mut batch);
                batch.finish(&mut self.nodes, &reader.status);
            }

            let now = Instant::now();
            let mut wake_at = now + STOP_CHECK;
            if let Some(at) = self.refresh_at {
                wake_at = wake_at.min(at);
            }
            let mut lost = Vec::new();
            let mut any_pending = false;
            for (index, node) in self.nodes.iter_mut().enumerate() {
                let Some(node) = node else { continue };
                match &mut node.state {
                    NodeState::Down { retry_at, .. } => wake_at = wake_at.min(*retry_at),
                    NodeState::Up {
                        link,
                        ready,
                        connect_deadline,
                        read_pending,
                        last_frame,
                    } => {
                        if let Err(e) = link.flush(reader.poll.registry()) {
                            lost.push((index, reader.describe(&e)));
                            continue;
                        }
                        let times = LinkTimes {
                            ready: *ready,
                            connect_deadline: *connect_deadline,
                            last_frame: *last_frame,
                        };
                        let ping_interval = reader.config.ping_interval;
                        match check_deadlines(
                            link,
                            times,
                            reader.io_wait,
                            ping_interval,
                            now,
                            wake_at,
                        ) {
                            Err(error) => {
                                lost.push((index, error));
                                continue;
                            }
                            Ok(Deadlines::Pinged) => any_pending = true,
                            Ok(Deadlines::WakeAt(at)) => wake_at = at,
                        }
                        any_pending |= *read_pending || link.has_input();
                    }
                }
            }
            for (index, error) in lost {
                self.link_lost(reader, index, error);
            }
            reader.status.set_subscribed(self.all_ready());
            self.publish_nodes(&reader.status);

            let timeout = if any_pending {
                Duration::ZERO
            } else {
                wake_at.saturating_duration_since(now)
            };
            match reader.poll.poll(&mut reader.events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return SessionEnd::Lost(format!("poll: {e}")),
            }
            if reader.stopping() {
                return SessionEnd::Stopped;
            }
            for event in reader.events.iter() {
                match event.token() {
                    CHANGES_TOKEN => changes_pending = true,
                    Token(token) if token >= FIRST_NODE_TOKEN => {
                        if let Some(Some(Node {
                            state: NodeState::Up { read_pending, .. },
                            ..
                        })) = self.nodes.get_mut(token - FIRST_NODE_TOKEN)
                        {
                            *read_pending |= event.is_readable() || event.is_read_closed();
                        }
                    }
                    _ => {}
                }
            }
            for index in 0..self.nodes.len() {
                if let Some(end) = self.read(reader, index) {
                    return end;
                }
            }
        }
    }

    /// Reads what link `index` has (at most `READS_PER_TURN` reads).
    fn read(&mut self, reader: &mut ReaderThread, index: usize) -> Option<SessionEnd> {
        let mut events = Vec::new();
        let failure = {
            let Some(Some(node)) = self.nodes.get_mut(index) else {
                return None;
            };
            let NodeState::Up {
                link,
                read_pending,
                last_frame,
                ..
            } = &mut node.state
            else {
                return None;
            };
            if !*read_pending && !link.has_input() {
                return None;
            }
            *read_pending = false;
            let mut failure = None;
            'reads: for turn in 0..READS_PER_TURN {
                match link.fill() {
                    Ok(Fill::Read(_)) => {}
                    Ok(Fill::WouldBlock) => break,
                    Err(e) => {
                        failure = Some(reader.describe(&e));
                        break;
                    }
                }
                let read_at = Instant::now();
                let read_unix_millis = clock::unix_millis(SystemTime::now());
                let mut frames = 0u32;
                loop {
                    let event = match link.next_event() {
                        Ok(Some(event)) => event,
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(reader.describe(&e));
                            break 'reads;
                        }
                    };
                    frames += 1;
                    match event {
                        Event::Message { channel, payload } => {
                            if let Some(end) =
                                reader.hand_over(channel, payload, read_at, read_unix_millis)
                            {
                                return Some(end);
                            }
                        }
                        Event::Subscription {
                            kind,
                            channel: Some(channel),
                            solicited,
                        } => events.push(Happened::Subscription {
                            kind,
                            channel: channel.to_vec(),
                            solicited,
                        }),
                        Event::Subscription { channel: None, .. } | Event::Done(_) => {}
                        Event::Pong { round_trip } => events.push(Happened::Pong(round_trip)),
                    }
                }
                if frames > 0 {
                    *last_frame = read_at;
                }
                if turn + 1 == READS_PER_TURN {
                    *read_pending = true;
                }
            }
            failure
        };
        for happened in events {
            self.on_event(reader, index, happened);
        }
        if let Some(error) = failure {
            self.link_lost(reader, index, error);
        }
        None
    }

    /// A confirmation, a `sunsubscribe` or a pong read on link `index`.
    fn on_event(&mut self, reader: &mut ReaderThread, index: usize, happened: Happened) {
        match happened {
            Happened::Pong(round_trip) => {
                reader.status.set_ping(round_trip);
                if let Some(node) = self.nodes[index].as_mut() {
                    node.ping = Some(round_trip);
                    if let NodeState::Up { ready, .. } = &mut node.state
                        && !*ready
                    {
                        *ready = true;
                        info!(
                            node = node.name.as_str(),
                            subscriptions = node.subscriptions;
                            "subscribed to Redis Cluster node"
                        );
                        if self
                            .nodes
                            .iter()
                            .flatten()
                            .all(|n| matches!(n.state, NodeState::Up { ready: true, .. }))
                        {
                            reader.subscribed();
                        }
                    }
                }
                self.nodes_dirty = true;
            }
            Happened::Subscription {
                kind,
                channel,
                solicited,
            } => {
                let prefix = reader.config.channel_prefix.as_bytes();
                let Some(user) = channel
                    .strip_prefix(prefix)
                    .and_then(|u| std::str::from_utf8(u).ok())
                else {
                    return;
                };
                match kind {
                    SubscriptionKind::Ssubscribe => self.answered(reader, index, user),
                    SubscriptionKind::Sunsubscribe if !solicited => {
                        self.moved_away(reader, index, user)
                    }
                    SubscriptionKind::Sunsubscribe => self.answered(reader, index, user),
                    _ => {}
                }
            }
        }
    }

    /// Redis answered an SSUBSCRIBE or SUNSUBSCRIBE of `user`'s channel on
    /// link `index`. Once the last one sent is answered, a wanted channel is
    /// confirmed (the loop hears it with the request it asked last) and an
    /// unwanted one is forgotten.
    fn answered(&mut self, reader: &ReaderThread, index: usize, user: &str) {
        let Some(wanted) = reader.wanted.as_ref() else {
            return;
        };
        let Some(place) = self.users.get_mut(user) else {
            return;
        };
        if place.node != Some(index) {
            return; // a reply from a link the user has left
        }
        match place.channel.answered() {
            Settled::Forget => {
                self.users.remove(user);
            }
            Settled::Confirmed => {
                self.confirmed += 1;
                if let Some(node) = self.nodes[index].as_mut() {
                    node.subscriptions += 1;
                }
                reader.status.set_subscriptions(self.confirmed);
                self.nodes_dirty = true;
                wanted.confirmations.push(user, place.channel.request);
            }
            Settled::InFlight | Settled::Unchanged => {}
        }
    }

    /// Redis dropped `user`'s subscription on link `index` by itself: its
    /// slot moved to another master. Subscribe again there.
    fn moved_away(&mut self, reader: &ReaderThread, index: usize, user: &str) {
        let Some(place) = self.users.get_mut(user) else {
            return;
        };
        if place.node != Some(index) {
            return;
        }
        if !place.channel.wanted {
            self.users.remove(user);
            return;
        }
        self.unplaced += 1;
        if place.unplace() {
            self.confirmed -= 1;
            if let Some(node) = self.nodes[index].as_mut() {
                node.subscriptions = node.subscriptions.saturating_sub(1);
            }
        }
        reader.status.set_subscriptions(self.confirmed);
        reader.status.count_resubscribes_after_migration(1);
        self.nodes_dirty = true;
        self.refresh_at = Some(Instant::now());
        self.ask_first = self.nodes[index].as_ref().map(|node| node.addr.clone());
        debug!(user_id = user, node = self.name_of(index); "slot moved: subscribing at the new owner");
    }
}

/// What a read found, handled once the link is no longer borrowed.
enum Happened {
    Subscription {
        kind: SubscriptionKind,
        channel: Vec<u8>,
        solicited: bool,
    },
    Pong(Duration),
}
