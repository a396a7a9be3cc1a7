//! The publisher: `PUBLISH user_noti:bench-{k % U} {"type":"bench","payload":{"seq":k,"t":T}}`
//! for k in 0..M, pipelined in batches, optionally paced to a fixed rate.
//! Runs on the main thread with a blocking Redis connection.
//!
//! With history (the `resume` preset) each message is published with
//! `FCALL ws_notify_publish 1 <channel> <message>` instead, which stores it in
//! the user's stream and publishes it with its stream id (README.md,
//! "Publishing with history").

use std::error::Error;
use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};

use crate::args::Options;
use crate::client::unix_micros;
use crate::token::user_id;

/// What publishing did.
pub struct Published {
    /// When the first batch was sent.
    pub first: Instant,
    /// When the last batch was acknowledged.
    pub last: Instant,
    pub sent: u64,
    /// Messages Redis delivered to no subscriber (the server was not subscribed).
    pub unheard: u64,
}

pub struct Publisher {
    con: Connection,
    /// `<prefix>bench-<u>` for every user.
    channels: Vec<String>,
    /// Publish with `FCALL ws_notify_publish` (history) instead of `PUBLISH`.
    fcall: bool,
}

impl Publisher {
    fn connect(url: &str, prefix: &str, users: usize) -> RedisResult<Publisher> {
        let con = redis::Client::open(url)?.get_connection()?;
        let channels = (0..users)
            .map(|u| format!("{prefix}{}", user_id(u)))
            .collect();
        Ok(Publisher {
            con,
            channels,
            fcall: false,
        })
    }

    /// Connects to `--redis-url` and warns when no gateway is subscribed there.
    pub fn for_options(options: &Options) -> Result<Publisher, Box<dyn Error>> {
        let mut p = Publisher::connect(&options.redis_url, &options.channel_prefix, options.users)
            .map_err(|e| format!("Redis {}: {e}", options.redis_url))?;
        if p.pattern_subscribers()? == 0 {
            eprintln!(
                "warning: no pattern subscription on {}: is ws-notify connected to this Redis?",
                options.redis_url
            );
        }
        Ok(p)
    }

    /// Publishes through the history function from now on.
    pub fn use_fcall(&mut self) {
        self.fcall = true;
    }

    /// Whether Redis has the gateway's `ws_notify` function library (loaded
    /// by a server started with history on).
    pub fn has_history_function(&mut self) -> RedisResult<bool> {
        let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg("ws_notify")
            .query(&mut self.con)?;
        Ok(!libraries.is_empty())
    }

    /// Publishes one `{"type":"bench-seed"}` to every user with FCALL, `batch`
    /// per pipeline, so each user's stream has an entry before the clients
    /// connect (their `position` is then an id the stream still holds).
    pub fn seed(&mut self, batch: usize) -> RedisResult<()> {
        for channels in self.channels.chunks(batch) {
            let mut pipe = redis::pipe();
            for channel in channels {
                pipe.cmd("FCALL")
                    .arg("ws_notify_publish")
                    .arg(1)
                    .arg(channel)
                    .arg(r#"{"type":"bench-seed"}"#);
            }
            let _ids: Vec<String> = pipe.query(&mut self.con)?;
        }
        Ok(())
    }

    /// Pattern subscriptions on the Redis server (the gateway holds one).
    fn pattern_subscribers(&mut self) -> RedisResult<i64> {
        redis::cmd("PUBSUB").arg("NUMPAT").query(&mut self.con)
    }

    /// Publishes `messages` messages, `batch` per pipeline, at `rate` msgs/s
    /// if given. At a fixed rate a pipeline holds a millisecond's worth (at
    /// least one), so the latency measured is not dominated by batching.
    pub fn run(
        &mut self,
        messages: u64,
        rate: Option<f64>,
        batch: usize,
    ) -> RedisResult<Published> {
        let batch = match rate {
            Some(rate) => ((rate / 1000.0) as usize).clamp(1, batch),
            None => batch,
        } as u64;
        let users = self.channels.len() as u64;
        let mut pipe = redis::pipe();
        let mut payload = String::with_capacity(96);
        let start = Instant::now();
        let mut first = None;
        let mut unheard = 0;
        let mut seq = 0;
        while seq < messages {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(seq as f64 / rate);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
            }
            let n = batch.min(messages - seq);
            pipe.clear();
            // One timestamp per batch, taken before it is encoded and sent, so
            // the measured latency includes the batch's own encoding.
            let t = unix_micros();
            for k in seq..seq + n {
                bench_payload(&mut payload, k, t);
                let channel = &self.channels[(k % users) as usize];
                if self.fcall {
                    pipe.cmd("FCALL")
                        .arg("ws_notify_publish")
                        .arg(1)
                        .arg(channel)
                        .arg(payload.as_bytes());
                } else {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload.as_bytes());
                }
            }
            first.get_or_insert_with(Instant::now);
            if self.fcall {
                // The stream ids; FCALL does not say how many subscribers heard.
                let _ids: Vec<String> = pipe.query(&mut self.con)?;
            } else {
                let heard: Vec<i64> = pipe.query(&mut self.con)?;
                unheard += heard.iter().filter(|&&h| h == 0).count() as u64;
            }
            seq += n;
        }
        let last = Instant::now();
        Ok(Published {
            first: first.unwrap_or(last),
            last,
            sent: seq,
            unheard,
        })
    }

    /// Publishes one pipeline: message `seq` to user `user` for each pair, all
    /// stamped with the same `t`. Returns how many no subscriber heard.
    pub fn publish(&mut self, messages: &[(u64, usize)]) -> RedisResult<u64> {
        let mut pipe = redis::pipe();
        let mut payload = String::with_capacity(96);
        let t = unix_micros();
        for &(seq, user) in messages {
            bench_payload(&mut payload, seq, t);
            pipe.cmd("PUBLISH")
                .arg(&self.channels[user])
                .arg(payload.as_bytes());
        }
        let heard: Vec<i64> = pipe.query(&mut self.con)?;
        Ok(heard.iter().filter(|&&h| h == 0).count() as u64)
    }
}

/// `{"type":"bench","payload":{"seq":K,"t":T}}` into `out` (cleared first).
fn bench_payload(out: &mut String, seq: u64, t: u64) {
    out.clear();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"type":"bench","payload":{{"seq":{seq},"t":{t}}}}}"#
    );
}

/// Waits until every expected message was delivered, or until none arrived
/// for `timeout`. `counts` returns (delivered, expected) so far; it is asked
/// every `nap`.
pub fn wait_for_deliveries(
    timeout: Duration,
    nap: Duration,
    mut counts: impl FnMut() -> (u64, u64),
) {
    let (mut seen, _) = counts();
    let mut progress_at = Instant::now();
    loop {
        let (delivered, expected) = counts();
        if delivered >= expected {
            return;
        }
        let now = Instant::now();
        if delivered != seen {
            seen = delivered;
            progress_at = now;
        } else if now.duration_since(progress_at) >= timeout {
            eprintln!(
                "drain timeout: {delivered} of {expected} delivered, none for {:.1} s",
                timeout.as_secs_f64()
            );
            return;
        }
        thread::sleep(nap);
    }
}
