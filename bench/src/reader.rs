//! `--preset reader`: the Redis reader alone, in this process. It runs
//! `ws_notify::redis_reader::RedisReader` (pattern mode) against the given
//! Redis, floods it from a pipelined publisher on another connection, drains
//! the hand-over as the event loop would (doing nothing else with the
//! messages), and reports the messages handed over per second and the reader
//! thread's CPU time per message (from /proc/self/task/<tid>/stat).

use std::error::Error;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use serde_json::{Value, json};
use ws_notify::config::{RedisConfig, SubscribeMode};

use crate::args::Options;

/// Commands per pipelined write of the publisher.
const PIPELINE: usize = 100;
/// Users the messages go to.
const USERS: u64 = 1_000;

/// The reader's results: the JSON line, the table, complete.
pub fn run(options: &Options) -> Result<(Value, String, bool), Box<dyn Error>> {
    let (host, port) = host_port(&options.redis_url)?;
    let config = RedisConfig {
        host: host.clone(),
        port,
        username: None,
        password: None,
        db: 0,
        use_tls: false,
        tls_ca_file: None,
        channel_prefix: "user_noti:".into(),
        ping_interval: Duration::from_secs(5),
        reconnect_max: Duration::from_secs(2),
        subscribe_mode: SubscribeMode::Pattern,
        cluster_nodes: Vec::new(),
        unsubscribe_linger: Duration::from_secs(5),
    };
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), Token(0))?);
    let spawned = ws_notify::redis_reader::RedisReader::spawn(config, waker)?;
    let (reader, inbox, status) = (spawned.0, spawned.1, spawned.2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status.is_subscribed() {
        if Instant::now() > deadline {
            return Err("the reader did not subscribe within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tid = reader_tid().ok_or("no redis-reader thread in /proc/self/task")?;
    let messages = options.messages;
    let publisher = std::thread::spawn(move || publish(&host, port, messages));

    let mut events = Events::with_capacity(8);
    let mut batch = Vec::with_capacity(4096);
    let mut received: u64 = 0;
    let mut first: Option<(Instant, u64)> = None;
    let mut last_progress = Instant::now();
    while received < messages && last_progress.elapsed() < Duration::from_secs(5) {
        inbox.rearm();
        if !inbox.has_waiting() {
            poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        }
        batch.clear();
        let n = inbox.drain_into(&mut batch, 4096) as u64;
        if n > 0 {
            if first.is_none() {
                first = Some((Instant::now(), cpu_ticks(tid)));
            }
            received += n;
            last_progress = Instant::now();
        }
    }
    let end = (Instant::now(), cpu_ticks(tid));
    publisher.join().map_err(|_| "publisher panicked")??;
    reader.stop();
    let (start, start_ticks) = first.ok_or("no message arrived")?;
    let seconds = end.0.duration_since(start).as_secs_f64();
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (end.1 - start_ticks) as f64 / ticks_per_second;
    let rate = received as f64 / seconds.max(1e-9);
    let cpu_per_message_us = cpu * 1e6 / received.max(1) as f64;
    let dropped = status.dropped_queue_full();
    let json = json!({
        "preset": "reader",
        "messages": messages,
        "handed_over": received,
        "dropped_queue_full": dropped,
        "seconds": seconds,
        "messages_per_second": rate.round(),
        "reader_cpu_seconds": cpu,
        "reader_cpu_us_per_message": cpu_per_message_us,
    });
    let table = format!(
        "reader: {received} of {messages} handed over in {seconds:.2} s = {rate:.0}/s; \
         reader thread CPU {cpu:.2} s = {cpu_per_message_us:.3} us/message; \
         {dropped} dropped (queue full)\n"
    );
    Ok((json, table, received == messages))
}

/// `redis://host:port[/...]` -> (host, port); no credentials.
fn host_port(url: &str) -> Result<(String, u16), Box<dyn Error>> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or("--redis-url: redis://host:port only")?;
    let rest = rest.split('/').next().unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "6379"));
    Ok((host.to_string(), port.parse()?))
}

/// Publishes `messages` ~130-byte messages to user_noti:u<k % USERS>,
/// `PIPELINE` commands per write; a second thread reads the replies.
fn publish(host: &str, port: u16, messages: u64) -> Result<(), String> {
    let mut out = TcpStream::connect((host, port)).map_err(|e| format!("publisher: {e}"))?;
    let mut replies = out.try_clone().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut lines = 0u64;
        while lines < messages {
            match replies.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            }
        }
    });
    let payload = br#"{"type":"order_shipped","payload":{"order_id":"A-1001","carrier":"UPS","tracking":"1Z999AA10123456784"}}"#;
    let mut chunk = Vec::with_capacity(PIPELINE * 200);
    let mut k = 0;
    while k < messages {
        chunk.clear();
        for _ in 0..PIPELINE.min((messages - k) as usize) {
            let channel = format!("user_noti:u{}", k % USERS);
            chunk.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
            chunk.extend_from_slice(format!("${}\r\n{channel}\r\n", channel.len()).as_bytes());
            chunk.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
            chunk.extend_from_slice(payload);
            chunk.extend_from_slice(b"\r\n");
            k += 1;
        }
        out.write_all(&chunk)
            .map_err(|e| format!("publisher: {e}"))?;
    }
    reader
        .join()
        .map_err(|_| "reply reader panicked".to_string())
}

/// The thread id of "redis-reader" in this process.
fn reader_tid() -> Option<u32> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .find_map(|entry| {
            let entry = entry.ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "redis-reader")
                .then(|| entry.file_name().to_str()?.parse().ok())
                .flatten()
        })
}

/// utime + stime of thread `tid`, in clock ticks.
fn cpu_ticks(tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}
