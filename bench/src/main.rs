//! ws-notify-bench: the load generator for ws-notify, behind the figures of
//! PERFORMANCE.md (README.md, "Load testing"). It connects to a running
//! server and to its Redis; it never starts either.
//!
//! ```text
//!  main thread ── sign tokens ── spawn clients ── wait: all open ── hold ── PUBLISH (pipelined) ── drain ── report
//!                                    │                                            │
//!  client thread 0..T: mio Poll ── connect / upgrade / count frames ◄── server ◄──┘ Redis
//! ```
//!
//! The client threads (`client.rs`, one connection loop for every preset)
//! share nothing but a few atomics with the main thread (progress, open
//! connections per user, the stop flag); each keeps its own histograms,
//! merged after `join`.
//!
//! The `soak` preset has its own main thread: `soak/` coordinates (churn,
//! paced publishing, exact expected counts, server RSS/fd samples) and talks
//! to the same client threads over channels.

// serde_json's `json!` of the soak summary nests deeper than the default 128.
#![recursion_limit = "256"]

mod args;
mod client;
mod counts;
mod frame;
mod histogram;
mod publish;
mod reader;
mod report;
mod resume;
mod soak;
mod sock;
mod token;

use std::error::Error;
use std::net::Ipv4Addr;
use std::process;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use args::{Command, Options, Preset};
use client::{Mode, Shared};
use publish::Publisher;
use report::{CpuMark, Summary};
use serde_json::Value;

/// How often the main thread checks the client threads' progress.
const PROGRESS_TICK: Duration = Duration::from_millis(2);
/// How often progress is printed while connecting.
const PROGRESS_PRINT: Duration = Duration::from_secs(1);

fn main() {
    let options = match args::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return;
        }
        Ok(Command::Run(options)) => options,
        Err(e) => {
            eprintln!("ws-notify-bench: {e}");
            process::exit(2);
        }
    };
    match measure(&options) {
        Ok((json, table, complete)) => {
            println!("{json}");
            eprint!("{table}");
            process::exit(if complete { 0 } else { 3 });
        }
        Err(e) => {
            eprintln!("ws-notify-bench: {e}");
            process::exit(1);
        }
    }
}

/// Runs the preset: the JSON line, the table, and whether the run was complete.
fn measure(options: &Options) -> Result<(Value, String, bool), Box<dyn Error>> {
    if options.preset == Preset::Reader {
        return reader::run(options);
    }
    let sources: Arc<[Ipv4Addr]> = source_addresses(options).into();
    if options.preset == Preset::Soak {
        let summary = soak::run(options, sources)?;
        Ok((summary.to_json(), summary.to_table(), summary.complete()))
    } else if options.preset == Preset::Resume {
        let summary = resume::run(options, sources)?;
        Ok((summary.to_json(), summary.to_table(), summary.complete()))
    } else {
        let summary = run(options, sources)?;
        Ok((summary.to_json(), summary.to_table(), summary.complete()))
    }
}

/// 127.0.0.1..=K when the server is on loopback and one address's ephemeral
/// ports may not suffice; empty means "let the kernel choose".
fn source_addresses(options: &Options) -> Vec<Ipv4Addr> {
    if !options.server.ip().is_loopback() {
        if options.source_addrs.is_some_and(|k| k > 1) {
            eprintln!("warning: --source-addrs ignored: the server is not on loopback");
        }
        return Vec::new();
    }
    // connect(2) tries odd ports first (even ones are left to bind(2)) and
    // walks past every port already used towards the same destination, so
    // past about half the range each connect costs a long search (measured:
    // beyond ~14,000 connections of a 28,000-port range the rate fell from
    // 15,000/s to under 1,000/s). Keep each source address a quarter full.
    let usable_ports = sock::ephemeral_ports() / 4;
    let k = options.source_addrs.unwrap_or(if options.churn {
        // Each cycle uses a port; spread them so none runs short.
        8
    } else if options.preset == Preset::Resume {
        // The reconnects' ports come on top of the first connections',
        // still in TIME_WAIT (the client closed first).
        (2 * options.connections).div_ceil(usable_ports.max(1))
    } else if options.preset == Preset::Soak {
        // Held connections plus a steady stream of new ones.
        options.connections.div_ceil(usable_ports.max(1)).max(4)
    } else {
        options.connections.div_ceil(usable_ports.max(1)).max(1)
    });
    if k <= 1 {
        return Vec::new();
    }
    (1..=k).map(|x| Ipv4Addr::new(127, 0, 0, x as u8)).collect()
}

/// Deliveries expected when message k goes to user k % U and user u has
/// `user_conns[u]` open connections.
fn expected_deliveries(user_conns: &[AtomicU32], messages: u64) -> u64 {
    let users = user_conns.len() as u64;
    user_conns
        .iter()
        .enumerate()
        .map(|(u, conns)| {
            let per_user = messages / users + u64::from((u as u64) < messages % users);
            u64::from(conns.load(Relaxed)) * per_user
        })
        .sum()
}

fn seconds(from: Instant, to: Option<Instant>) -> f64 {
    to.map_or(0.0, |to| to.saturating_duration_since(from).as_secs_f64())
}

fn run(options: &Options, sources: Arc<[Ipv4Addr]>) -> Result<Summary, Box<dyn Error>> {
    let per_connection = if options.churn {
        options.concurrency
    } else {
        options.connections
    };
    sock::raise_nofile_limit_for(per_connection + 32)?;
    let mut publisher = if options.messages > 0 {
        Some(Publisher::for_options(options)?)
    } else {
        None
    };

    let rss = |pid: Option<u32>| pid.and_then(report::rss_kib);
    let rss_before = rss(options.server_pid);
    if options.server_pid.is_some() && rss_before.is_none() {
        eprintln!(
            "warning: cannot read VmRSS of --server-pid {:?}",
            options.server_pid
        );
    }

    let cpu_mark = || CpuMark::take(options.server_pid, options.redis_pid);
    let shared = Arc::new(Shared::new(options.threads, options.users));
    let cpu_start = cpu_mark();
    let start = Instant::now();
    let handles = client::spawn(options, &sources, &shared, |_| {
        if options.churn {
            Mode::Churn {
                until: start + options.duration,
            }
        } else {
            Mode::Hold
        }
    })?;

    // Connect (hold) or churn until every thread has settled.
    let what = if options.churn {
        "handshaking"
    } else {
        "connecting"
    };
    let mut next_print = start + PROGRESS_PRINT;
    while !shared.all_settled() {
        thread::sleep(PROGRESS_TICK);
        let now = Instant::now();
        if now >= next_print {
            next_print = now + PROGRESS_PRINT;
            eprintln!(
                "{what}: {} open, {} failed ({:.1} s)",
                shared.sum(|c| &c.opened),
                shared.sum(|c| &c.failed),
                now.duration_since(start).as_secs_f64()
            );
        }
    }
    let cpu_connect = cpu_mark().since(&cpu_start);
    let rss_connected = rss(options.server_pid);

    if !options.hold.is_zero() && !options.churn {
        eprintln!(
            "holding {} connections for {:.1} s",
            shared.sum(|c| &c.opened),
            options.hold.as_secs_f64()
        );
        thread::sleep(options.hold);
    }

    let mut expected = 0;
    let mut published = None;
    let mut metrics_before = None;
    let mut metrics_error = None;
    let mut cpu_publish = None;
    if let Some(publisher) = publisher.as_mut() {
        if options.metrics {
            match report::scrape_metrics(options.server, &options.host) {
                Ok(m) => metrics_before = Some(m),
                Err(e) => metrics_error = Some(e.to_string()),
            }
        }
        expected = expected_deliveries(&shared.user_conns, options.messages);
        eprintln!(
            "publishing {} messages ({} deliveries expected){}",
            options.messages,
            expected,
            options
                .rate
                .map_or(String::new(), |r| format!(" at {r} msg/s"))
        );
        let cpu_before = cpu_mark();
        let p = publisher.run(options.messages, options.rate, options.batch)?;
        publish::wait_for_deliveries(options.drain_timeout, PROGRESS_TICK, || {
            (shared.sum(|c| &c.delivered), expected)
        });
        cpu_publish = Some(cpu_mark().since(&cpu_before));
        published = Some(p);
    }
    let rss_end = rss(options.server_pid);
    let server_metrics = match metrics_before {
        Some(before) => match report::scrape_metrics(options.server, &options.host) {
            Ok(after) => Some(report::metrics_delta(&before, &after)),
            Err(e) => {
                metrics_error = Some(e.to_string());
                None
            }
        },
        None => None,
    };

    shared.stop.store(true, SeqCst);
    let total = client::join(handles)?;

    let (published_count, publish_secs, unheard, deliver_secs) = match &published {
        Some(p) => (
            p.sent,
            p.last.duration_since(p.first).as_secs_f64(),
            p.unheard,
            seconds(p.first, total.last_receive),
        ),
        None => (0, 0.0, 0, 0.0),
    };
    Ok(Summary {
        preset: options.preset.name(),
        churn: options.churn,
        target_connections: options.connections,
        users: options.users,
        threads: options.threads,
        concurrency: options.concurrency,
        source_addrs: sources.len().max(1),
        opened: total.opened,
        failures: total.failures,
        lost: total.lost,
        connect_secs: seconds(start, total.last_open),
        handshake: total.handshake,
        cycles: total.cycles,
        close_timeouts: total.close_timeouts,
        messages: options.messages,
        published: published_count,
        publish_secs,
        unheard,
        expected,
        delivered: total.delivered,
        deliver_secs,
        latency: total.latency,
        rss_before,
        rss_connected,
        rss_end,
        server_metrics,
        cpu_connect,
        cpu_publish,
        metrics_error,
        other_frames: total.other_frames,
        pings: total.pings,
        masked_frames: total.masked_frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_counts_connections_per_user() {
        // 3 users with 2, 0, 1 connections; 7 messages: users get 3, 2, 2.
        let conns = [AtomicU32::new(2), AtomicU32::new(0), AtomicU32::new(1)];
        assert_eq!(expected_deliveries(&conns, 7), 6 + 2);
        assert_eq!(expected_deliveries(&conns, 0), 0);
    }
}
