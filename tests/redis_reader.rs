//! The Redis reader thread through the library's API, against a real
//! `redis-server`: subscription, the hand-over to a real mio `Poll`/`Waker`
//! (as the event loop uses it), pings, reconnects, credentials and stopping.
//! The gateway-level behaviour (health, metrics, delivery to WebSocket
//! clients) is in redis_faults.rs and redis_resilience.rs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{PROMPT, RedisServer, free_port, ms, secs, wait_for, wait_until};
use mio::{Events, Poll, Token, Waker};
use ws_notify::config::{RedisConfig, SubscribeMode};
use ws_notify::handover::{Inbox, Published};
use ws_notify::redis_reader::RedisReader;
use ws_notify::redis_status::RedisStatus;
use ws_notify::subscriptions::{Confirmed, PerUser};

const WAKE: Token = Token(7);

fn config(port: u16) -> RedisConfig {
    RedisConfig {
        host: "127.0.0.1".into(),
        port,
        username: None,
        password: None,
        db: 0,
        use_tls: false,
        tls_ca_file: None,
        channel_prefix: "user_noti:".into(),
        ping_interval: ms(200),
        reconnect_max: secs(2),
        subscribe_mode: SubscribeMode::Pattern,
        cluster_nodes: Vec::new(),
        unsubscribe_linger: secs(5),
    }
}

/// The event loop's side: a real Poll and Waker, driven as the server's loop
/// drives them.
struct LoopSide {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    /// Poll returns caused by the waker.
    wakes: u64,
}

impl LoopSide {
    fn new() -> LoopSide {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
        LoopSide {
            poll,
            events: Events::with_capacity(16),
            waker,
            wakes: 0,
        }
    }

    fn spawn(&self, config: RedisConfig) -> (RedisReader, Inbox, Arc<RedisStatus>) {
        let (reader, inbox, status, per_user) =
            RedisReader::spawn(config, Arc::clone(&self.waker)).expect("spawn reader");
        assert!(per_user.is_none(), "per-user queues in pattern mode");
        (reader, inbox, status)
    }

    /// Re-arms, blocks while nothing waits, drains in batches of 64, until
    /// `want` messages arrived. `pause` simulates a loop busy with sockets.
    fn collect(&mut self, inbox: &Inbox, want: usize, pause: Duration) -> Vec<Published> {
        let deadline = Instant::now() + secs(10);
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "got {} of {want} messages",
                got.len()
            );
            inbox.rearm();
            if !inbox.has_waiting() {
                self.poll
                    .poll(&mut self.events, Some(ms(50)))
                    .expect("poll");
                self.wakes += u64::from(self.events.iter().any(|e| e.token() == WAKE));
            }
            if inbox.has_waiting() {
                std::thread::sleep(pause);
                inbox.drain_into(&mut got, 64);
            }
        }
        got
    }
}

fn wait_subscribed(status: &RedisStatus) {
    wait_until(secs(10), "subscribed", || status.is_subscribed());
}

/// A reader subscribed to `redis`, configured by `config` changed by `edit`.
fn subscribed(
    redis: &RedisServer,
    edit: impl FnOnce(&mut RedisConfig),
) -> (LoopSide, RedisReader, Inbox, Arc<RedisStatus>) {
    let side = LoopSide::new();
    let mut cfg = config(redis.port);
    edit(&mut cfg);
    let (reader, inbox, status) = side.spawn(cfg);
    wait_subscribed(&status);
    (side, reader, inbox, status)
}

/// Waits until a connection attempt failed and returns the recorded error.
fn wait_connect_failure(status: &RedisStatus) -> String {
    wait_until(secs(10), "a failed connection attempt", || {
        status.connect_failures() >= 1
    });
    assert!(!status.is_subscribed());
    status.last_error().expect("error recorded")
}

/// A publisher connection as an ACL user.
fn publish_as(port: u16, user: &str, password: &str, channel: &str, payload: &[u8]) -> i64 {
    let mut con = redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{port}/"))
        .and_then(|c| c.get_connection_with_timeout(PROMPT))
        .expect("publisher connection");
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut con)
        .expect("PUBLISH")
}

#[test]
fn delivers_messages_with_user_id_and_raw_payload() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, status) = subscribed(&redis, |_| {});
    assert!(
        status.ping_micros().is_some(),
        "first ping right after subscribing"
    );
    assert_eq!(status.last_message_unix_millis(), None);

    assert_eq!(
        redis.publish("user_noti:org:7:user:9", br#"{"type":"t"}"#),
        1
    );
    // A channel matching the pattern with an empty id is read and dropped.
    assert_eq!(redis.publish("user_noti:", b"x"), 1);
    // Payloads are raw bytes, not necessarily UTF-8.
    assert_eq!(redis.publish("user_noti:42", b"\xff\x00bin"), 1);
    // Not matching the pattern: Redis does not deliver it at all.
    assert_eq!(redis.publish("other:42", b"x"), 0);

    let got = side.collect(&inbox, 2, Duration::ZERO);
    assert_eq!(got[0].user_id(), "org:7:user:9");
    assert_eq!(got[0].payload(), br#"{"type":"t"}"#);
    assert_eq!(got[1].user_id(), "42");
    assert_eq!(got[1].payload(), b"\xff\x00bin");
    assert_eq!(status.received(), 3);
    assert_eq!(status.dropped_invalid_channel(), 1);
    assert_eq!(status.dropped_queue_full(), 0);
    let last = status
        .last_message_unix_millis()
        .expect("last message time");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    assert!(last.abs_diff(now) < 60_000, "{last} vs {now}");
    assert_eq!(inbox.queued(), 0);

    reader.stop();
    reader.join().expect("reader thread");
    assert!(!status.is_subscribed());
}

#[test]
fn channel_that_is_not_utf8_is_dropped_and_counted() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, status) = subscribed(&redis, |_| {});
    let mut con = redis.connection().expect("publisher");
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&b"user_noti:\xff\xfe"[..])
        .arg("x")
        .query(&mut con)
        .expect("PUBLISH");
    assert_eq!(receivers, 1);
    assert_eq!(redis.publish("user_noti:after", b"y"), 1);
    let got = side.collect(&inbox, 1, Duration::ZERO);
    assert_eq!(got[0].user_id(), "after");
    assert_eq!(status.dropped_invalid_channel(), 1);
    reader.stop();
}

#[test]
fn prefix_glob_characters_match_literally() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, _status) =
        subscribed(&redis, |cfg| cfg.channel_prefix = "n?[a]*\\:".into());
    assert_eq!(redis.publish("nX[a]*\\:1", b"glob"), 0);
    assert_eq!(redis.publish("n?a*\\:1", b"glob"), 0);
    assert_eq!(redis.publish("n?[a]*\\:1", b"literal"), 1);
    let got = side.collect(&inbox, 1, Duration::ZERO);
    assert_eq!(got[0].user_id(), "1");
    assert_eq!(got[0].payload(), b"literal");
    reader.stop();
}

#[test]
fn wakes_are_coalesced_per_batch() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, _status) = subscribed(&redis, |_| {});
    let mut con = redis.connection().expect("publisher");
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("PUBLISH")
            .arg(format!("user_noti:u{}", i % 10))
            .arg(i.to_string())
            .ignore();
    }
    pipe.query::<()>(&mut con).expect("pipelined PUBLISH");
    let got = side.collect(&inbox, 1000, ms(1));
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.payload(), i.to_string().as_bytes(), "in order");
        assert_eq!(p.user_id(), format!("u{}", i % 10));
    }
    assert!(
        side.wakes <= 100 && inbox.wakes() <= 100,
        "{} loop wakes / {} waker calls for 1000 messages",
        side.wakes,
        inbox.wakes()
    );
    reader.stop();
}

#[test]
fn reconnects_after_server_restart() {
    let mut redis = RedisServer::start();
    let (mut side, reader, inbox, status) = subscribed(&redis, |_| {});
    assert_eq!(status.reconnects(), 0);
    assert_eq!(status.last_error(), None);

    redis.kill();
    wait_until(secs(10), "not subscribed", || !status.is_subscribed());
    assert!(status.last_error().is_some());
    assert_eq!(status.ping_micros(), None);

    redis.restart();
    wait_subscribed(&status);
    assert_eq!(status.reconnects(), 1);
    assert_eq!(redis.publish("user_noti:back", b"again"), 1);
    let got = side.collect(&inbox, 1, Duration::ZERO);
    assert_eq!(got[0].payload(), b"again");
    reader.stop();
    reader.join().expect("reader thread");
}

#[test]
fn frozen_server_is_caught_by_ping() {
    let redis = RedisServer::start();
    let (_side, reader, _inbox, status) = subscribed(&redis, |_| {});
    redis.signal(libc::SIGSTOP);
    // ping_interval (200 ms) + pong wait (1 s minimum), with a generous deadline.
    wait_until(secs(10), "frozen server noticed", || {
        !status.is_subscribed()
    });
    let error = status.last_error().expect("error recorded");
    assert!(error.contains("PING"), "{error}");
    redis.signal(libc::SIGCONT);
    wait_subscribed(&status);
    assert_eq!(status.reconnects(), 1);
    reader.stop();
}

#[test]
fn pings_when_idle_but_not_under_traffic() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, status) = subscribed(&redis, |cfg| cfg.ping_interval = ms(50));
    let idle_from = status.pings();
    wait_until(secs(10), "idle pings", || status.pings() >= idle_from + 3);
    // Traffic every 5 ms keeps the link busy: messages prove it alive, and no
    // ping is sent (redis-rs would hold every message read before its pong).
    // The publisher is paced against the reader, so each message is read well
    // within the 50 ms interval before the next is sent.
    let busy_from = status.pings();
    let sent = 200;
    for n in 0..sent {
        redis.publish("user_noti:busy", b"m");
        wait_until(secs(10), "the reader to read it", || status.received() > n);
        std::thread::sleep(ms(5));
    }
    let pings_under_traffic = status.pings() - busy_from;
    side.collect(&inbox, sent as usize, Duration::ZERO);
    // Once the link is quiet again, pings resume.
    let quiet_from = status.pings();
    wait_until(secs(10), "pings after the traffic", || {
        status.pings() >= quiet_from + 3
    });
    // Pinging regardless of traffic would make at least 20 (one per 50 ms over
    // more than a second); a gap over 50 ms on a loaded machine may allow one.
    assert!(
        pings_under_traffic < 10,
        "{pings_under_traffic} pings while a message arrived every 5 ms"
    );
    assert!(status.is_subscribed());
    assert_eq!(status.reconnects(), 0);
    assert_eq!(status.connect_failures(), 0);
    reader.stop();
}

/// An ACL-only Redis: `notifier` may read `user_noti:*`, `publisher` may
/// publish anywhere (the harness PINGs and PUBLISHes as `publisher`).
fn acl_redis() -> RedisServer {
    RedisServer::start_with(
        &[
            "--user",
            "default",
            "off",
            "--user",
            "notifier",
            "on",
            ">s3cret-pw",
            "~*",
            "&user_noti:*",
            "+@all",
            "--user",
            "publisher",
            "on",
            ">pub-pw",
            "~*",
            "&*",
            "+@all",
        ],
        Some("publisher"),
        Some("pub-pw"),
    )
}

#[test]
fn authenticates_with_acl_user_and_selects_db() {
    let redis = acl_redis();
    let (mut side, reader, inbox, _status) = subscribed(&redis, |cfg| {
        cfg.username = Some("notifier".into());
        cfg.password = Some("s3cret-pw".into());
        cfg.db = 3;
    });
    assert_eq!(
        publish_as(redis.port, "publisher", "pub-pw", "user_noti:acl", b"ok"),
        1
    );
    let got = side.collect(&inbox, 1, Duration::ZERO);
    assert_eq!(got[0].user_id(), "acl");
    reader.stop();
}

/// (what, server port, username, password, what the error must name).
type CredentialCase<'a> = (
    &'a str,
    u16,
    Option<&'a str>,
    Option<&'a str>,
    &'a [&'a str],
);

/// A refused login names the variables to check, never the password
/// (issue 10: "a refused Redis password should name REDIS_PASSWORD/REDIS_USERNAME").
#[test]
fn refused_credentials_name_the_variables_and_never_the_password() {
    let acl = acl_redis();
    let requirepass = RedisServer::start_with_auth(None, "right-pw");
    let side = LoopSide::new();
    let cases: [CredentialCase; 4] = [
        (
            "wrong ACL password",
            acl.port,
            Some("notifier"),
            Some("wrong-pw"),
            &["REDIS_USERNAME", "REDIS_PASSWORD", "\"notifier\""],
        ),
        (
            "unknown ACL user",
            acl.port,
            Some("nobody"),
            Some("s3cret-pw"),
            &["REDIS_USERNAME", "REDIS_PASSWORD", "\"nobody\""],
        ),
        (
            "wrong requirepass",
            requirepass.port,
            None,
            Some("wrong-pw"),
            &["REDIS_PASSWORD"],
        ),
        (
            "no password",
            requirepass.port,
            None,
            None,
            &["REDIS_PASSWORD"],
        ),
    ];
    for (what, port, username, password, names) in cases {
        let mut cfg = config(port);
        cfg.username = username.map(str::to_string);
        cfg.password = password.map(str::to_string);
        let (reader, _inbox, status) = side.spawn(cfg);
        let error = wait_connect_failure(&status);
        eprintln!("{what}: {error}");
        for name in names {
            assert!(
                error.contains(name),
                "{what}: {name} not named in {error:?}"
            );
        }
        for secret in ["wrong-pw", "s3cret-pw", "right-pw"] {
            assert!(!error.contains(secret), "{what}: password in {error:?}");
        }
        reader.stop();
    }
}

#[test]
fn channel_acl_refusal_is_a_connect_failure() {
    let redis = RedisServer::start_with(
        &[
            "--user", "default", "off", "--user", "narrow", "on", ">pw", "~*", "&other:*", "+@all",
        ],
        Some("narrow"),
        Some("pw"),
    );
    let side = LoopSide::new();
    let mut cfg = config(redis.port);
    cfg.username = Some("narrow".into());
    cfg.password = Some("pw".into());
    let (reader, _inbox, status) = side.spawn(cfg);
    let error = wait_connect_failure(&status);
    let lower = error.to_ascii_lowercase();
    assert!(
        lower.contains("psubscribe") && lower.contains("noperm"),
        "{error}"
    );
    reader.stop();
}

#[test]
fn unreadable_ca_file_is_a_start_up_error() {
    let side = LoopSide::new();
    let mut cfg = config(free_port());
    cfg.use_tls = true;
    cfg.tls_ca_file = Some(std::env::temp_dir().join("ws-notify-no-such-ca.crt"));
    let error = RedisReader::spawn(cfg, Arc::clone(&side.waker))
        .err()
        .expect("missing CA file refused");
    assert!(error.to_string().contains("REDIS_TLS_CA_FILE"), "{error}");
}

#[test]
fn unreachable_server_counts_failures_and_stops_promptly() {
    let side = LoopSide::new();
    let (reader, _inbox, status) = side.spawn(config(free_port()));
    wait_until(secs(10), "connect failures", || {
        status.connect_failures() >= 2
    });
    assert!(!status.is_subscribed());
    assert!(status.last_error().is_some());
    reader.stop();
    // The thread looks at the stop flag at least every 250 ms, even while it
    // sleeps between attempts; the deadline is generous for a loaded machine.
    wait_until(PROMPT, "the reader thread to end", || reader.is_finished());
    reader.join().expect("reader thread");
}

#[test]
fn reader_ends_when_inbox_is_dropped() {
    let redis = RedisServer::start();
    let (_side, reader, inbox, _status) = subscribed(&redis, |_| {});
    drop(inbox);
    redis.publish("user_noti:gone", b"x");
    wait_until(secs(10), "thread end", || reader.is_finished());
}

#[test]
fn backoff_stays_under_the_configured_cap() {
    let side = LoopSide::new();
    let mut cfg = config(free_port());
    cfg.reconnect_max = ms(100);
    let (reader, _inbox, status) = side.spawn(cfg);
    // With a 100 ms cap the delays average 50 ms: 30 attempts take about
    // 1.5 s. With the default 2 s cap they would take about 27 s, and with
    // no cap (100 ms doubling) hours: the deadline lies between, generous for
    // the capped case on a loaded machine.
    let started = Instant::now();
    wait_for(secs(15), "30 attempts under a 100 ms cap", || {
        (status.connect_failures() >= 30).then_some(())
    });
    eprintln!("30 attempts after {:?}", started.elapsed());
    reader.stop();
}

// --- channel mode ----------------------------------------------------------------

/// A reader in `channel` mode and the loop's ends of its per-user queues.
fn channel_reader(
    redis: &RedisServer,
) -> (LoopSide, RedisReader, Inbox, Arc<RedisStatus>, PerUser) {
    let side = LoopSide::new();
    let mut cfg = config(redis.port);
    cfg.subscribe_mode = SubscribeMode::Channel;
    let (reader, inbox, status, per_user) =
        RedisReader::spawn(cfg, Arc::clone(&side.waker)).expect("spawn reader");
    let per_user = per_user.expect("per-user queues in channel mode");
    wait_subscribed(&status);
    (side, reader, inbox, status, per_user)
}

impl LoopSide {
    /// Drains confirmations until `want` more arrived; returns them in order.
    fn confirmations(&mut self, confirmed: &Confirmed, want: usize) -> Vec<Box<str>> {
        let deadline = Instant::now() + secs(20);
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "{} of {want} confirmations",
                got.len()
            );
            if !confirmed.has_waiting() {
                self.poll
                    .poll(&mut self.events, Some(ms(50)))
                    .expect("poll");
            }
            confirmed.drain_into(&mut got);
        }
        got
    }
}

fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let mut con = redis.connection().expect("connection");
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut con)
        .expect("PUBSUB NUMSUB");
    n
}

/// `calls` of `cmdstat_<command>` in `INFO commandstats`.
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut con = redis.connection().expect("connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .expect("INFO");
    let key = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(key.as_str()))
        .map_or(0, |rest| {
            rest.split(',')
                .next()
                .unwrap_or("0")
                .parse()
                .expect("calls")
        })
}

#[test]
fn channel_mode_confirms_then_delivers_only_subscribed_users() {
    let redis = RedisServer::start();
    let (mut side, reader, inbox, status, mut per_user) = channel_reader(&redis);
    assert_eq!(status.subscriptions(), 0);
    // Nobody wanted: nothing subscribed, nothing delivered.
    assert_eq!(redis.notify("alice", b"early"), 0);

    per_user.requests.subscribe("alice");
    per_user.requests.subscribe("bob");
    per_user.requests.send();
    let mut got = side.confirmations(&per_user.confirmed, 2);
    got.sort();
    assert_eq!(got, [Box::from("alice"), Box::from("bob")]);
    assert_eq!(status.subscriptions(), 2);
    assert_eq!(status.subscribes(), 2);

    assert_eq!(redis.notify("alice", b"a1"), 1);
    assert_eq!(redis.notify("carol", b"c1"), 0, "carol is not subscribed");
    assert_eq!(redis.notify("bob", b"b1"), 1);
    let messages = side.collect(&inbox, 2, Duration::ZERO);
    assert_eq!(
        (messages[0].user_id(), messages[0].payload()),
        ("alice", &b"a1"[..])
    );
    assert_eq!(
        (messages[1].user_id(), messages[1].payload()),
        ("bob", &b"b1"[..])
    );

    // Unsubscribe, and a subscribe of a user already confirmed: confirmed at once.
    per_user.requests.unsubscribe("bob");
    per_user.requests.subscribe("alice");
    per_user.requests.send();
    assert_eq!(
        side.confirmations(&per_user.confirmed, 1),
        [Box::from("alice")]
    );
    wait_until(secs(10), "bob unsubscribed", || {
        numsub(&redis, "user_noti:bob") == 0
    });
    assert_eq!(numsub(&redis, "user_noti:alice"), 1);
    assert_eq!(redis.notify("bob", b"b2"), 0);
    assert_eq!(status.subscriptions(), 1);
    assert_eq!(status.unsubscribes(), 1);
    assert_eq!(status.subscribes(), 2, "alice was not subscribed twice");

    // Subscribe and unsubscribe of one user in one batch: applied in order,
    // and the subscribe is still confirmed.
    per_user.requests.subscribe("dave");
    per_user.requests.unsubscribe("dave");
    per_user.requests.send();
    assert_eq!(
        side.confirmations(&per_user.confirmed, 1),
        [Box::from("dave")]
    );
    wait_until(secs(10), "dave unsubscribed", || {
        numsub(&redis, "user_noti:dave") == 0
    });
    assert!(status.is_subscribed());
    reader.stop();
    reader.join().expect("reader thread");
}

#[test]
fn ten_thousand_subscribes_take_few_commands() {
    let redis = RedisServer::start();
    let (mut side, reader, _inbox, status, mut per_user) = channel_reader(&redis);
    let before = command_calls(&redis, "subscribe");
    let users: Vec<String> = (0..10_000).map(|i| format!("storm-{i}")).collect();
    for user in &users {
        per_user.requests.subscribe(user);
    }
    per_user.requests.send();
    let got = side.confirmations(&per_user.confirmed, users.len());
    assert_eq!(got.len(), users.len());
    let commands = command_calls(&redis, "subscribe") - before;
    eprintln!("10,000 channels in {commands} SUBSCRIBE commands");
    assert!(commands <= 20, "{commands} SUBSCRIBE commands");
    assert_eq!(status.subscriptions(), 10_000);
    assert_eq!(numsub(&redis, "user_noti:storm-9999"), 1);
    reader.stop();
}

#[test]
fn channel_mode_resubscribes_everything_after_a_restart() {
    let mut redis = RedisServer::start();
    let (mut side, reader, inbox, status, mut per_user) = channel_reader(&redis);
    let users: Vec<String> = (0..2_500).map(|i| format!("r{i}")).collect();
    for user in &users {
        per_user.requests.subscribe(user);
    }
    per_user.requests.send();
    side.confirmations(&per_user.confirmed, users.len());

    redis.kill();
    wait_until(secs(10), "not subscribed", || !status.is_subscribed());
    assert_eq!(status.subscriptions(), 0);
    // A change while Redis is down is applied to what the next link subscribes.
    per_user.requests.unsubscribe("r0");
    per_user.requests.send();
    redis.restart();
    wait_subscribed(&status);
    // Subscribed means every wanted channel is confirmed again.
    for user in &users[1..] {
        assert_eq!(numsub(&redis, &format!("user_noti:{user}")), 1, "{user}");
    }
    assert_eq!(numsub(&redis, "user_noti:r0"), 0);
    assert_eq!(status.subscriptions(), 2_499);
    assert_eq!(status.resubscribes_after_reconnect(), 2_499);
    assert_eq!(status.reconnects(), 1);
    // The confirmations are pushed again (the loop ignores users nobody waits for).
    side.confirmations(&per_user.confirmed, users.len() - 1);
    assert_eq!(redis.notify("r7", b"back"), 1);
    let got = side.collect(&inbox, 1, Duration::ZERO);
    assert_eq!((got[0].user_id(), got[0].payload()), ("r7", &b"back"[..]));
    reader.stop();
}

/// A fake Redis that confirms the PSUBSCRIBE and the first PING, then sends
/// one byte of a frame that never ends every 100 ms and answers nothing else.
#[test]
fn a_trickling_server_is_declared_lost_within_the_bounded_wait() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_stop = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        listener.set_nonblocking(true).expect("nonblocking");
        let mut streams = Vec::new();
        while !server_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((mut stream, _)) = listener.accept() {
                stream.set_nonblocking(false).expect("blocking");
                let mut buf = [0u8; 4096];
                // AUTH-less PSUBSCRIBE + PING arrive in one write.
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"*3\r\n$10\r\npsubscribe\r\n$11\r\nuser_noti:*\r\n:1\r\n\
                      *2\r\n$4\r\npong\r\n$0\r\n\r\n",
                );
                streams.push(stream);
            }
            for stream in &mut streams {
                let _ = stream.write_all(b"*");
            }
            std::thread::sleep(ms(100));
        }
    });
    let side = LoopSide::new();
    let mut cfg = config(port);
    cfg.ping_interval = ms(200);
    let (reader, _inbox, status) = side.spawn(cfg);
    wait_subscribed(&status);
    let subscribed_at = Instant::now();
    wait_until(secs(10), "the trickling link declared lost", || {
        !status.is_subscribed()
    });
    // ping_interval (200 ms) + io_wait (1 s minimum); generous for a loaded machine.
    let lost_after = subscribed_at.elapsed();
    let error = status.last_error().expect("error recorded");
    assert!(error.contains("PING: no reply within"), "{error}");
    assert!(lost_after < secs(5), "lost after {lost_after:?}");
    reader.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("fake server");
}
