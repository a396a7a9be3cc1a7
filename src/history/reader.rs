//! The history reader thread ("history-reader"): reads users' streams for
//! connections that open with history on, so that the event loop never waits
//! on Redis.
//!
//! ```text
//!  [event loop]      HistoryReader::request(Request)  --mpsc-->
//!  [history-reader]  takes every waiting request (at most MAX_BATCH), sends one
//!                    pipeline for the batch (XREVRANGE per request), encodes the
//!                    replayed frames, pushes the answers, wakes the loop once
//!  [event loop]      HistoryReader::drain_answers() when answers_waiting()
//! ```
//!
//! The thread has its own blocking Redis connection (built like the reader's),
//! with short timeouts: when Redis is down or slow every waiting request is
//! answered `Unavailable` within about `IO_WAIT` (plus one connect attempt),
//! so a resuming client gets `connected` with `complete:false` instead of
//! hanging. On each (re)connect it loads the `ws_notify` function library
//! (`FUNCTION LOAD REPLACE`): a Redis restarted without persistence has lost it.
//!
//! In sharded mode (Redis Cluster) it holds a connection per master
//! ([`crate::cluster::Nodes`]), loads the library on each, and reads each
//! user's stream on the master that owns its slot (the stream's key is the
//! channel's name, so the same slot as the channel): one pipeline per master.

use std::collections::BTreeMap;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use redis::{Client, Connection, Value};

use super::{StreamId, library_code, load_library, splice_id};
use crate::clock::Timestamp;
use crate::cluster::{NodeAddr, Nodes, Redirect};
use crate::config::{RedisConfig, SubscribeMode};
use crate::logging::RateLimited;
use crate::message::{Frame, MessageEncoder};
use crate::redis_reader::build_client;
use crate::redis_status::RedisStatus;

/// Requests served by one pipeline: bounds a batch's latency and memory in a
/// reconnect storm (the rest wait for the next batch, a few ms later).
const MAX_BATCH: usize = 4096;
/// Connect, write and read timeout of the history connection.
const IO_WAIT: Duration = Duration::from_secs(1);
/// After a failed connect, requests are answered `Unavailable` at once for
/// this long rather than each batch waiting for another connect attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a batch waits for the Redis reader's subscription (just after
/// start it may not be made yet) before it is answered `Unavailable`.
const SUBSCRIBED_WAIT: Duration = IO_WAIT;
/// How often that wait looks at the subscription again.
const SUBSCRIBED_CHECK: Duration = Duration::from_millis(5);

/// How often an idle thread checks its connection: a Redis restarted without
/// persistence has lost the function library, and publishers need it back
/// before the next client happens to connect.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What the history reader needs.
#[derive(Clone, Debug)]
pub struct HistorySettings {
    pub redis: RedisConfig,
    /// `WS_HISTORY_SIZE` (> 0): the stream cap, and the most messages replayed.
    pub size: usize,
    /// `WS_HISTORY_TTL`.
    pub ttl: Duration,
}

/// A connection that opened with history on and waits for its history read.
#[derive(Debug)]
pub struct Request {
    /// The connection's slab key and id (the key may be reused once it closes).
    pub key: usize,
    pub connection_id: u64,
    pub user_id: String,
    /// The `since` of a resume; None for a fresh connection (position only).
    pub since: Option<StreamId>,
}

/// The answer to a [`Request`].
#[derive(Debug)]
pub struct Answer {
    pub key: usize,
    pub connection_id: u64,
    /// The request's user id and `since`, for `connected`.
    pub user_id: String,
    pub since: Option<StreamId>,
    pub outcome: Outcome,
}

/// What the read found.
#[derive(Debug)]
pub enum Outcome {
    /// Redis could not be read (down, slow, or refused the read).
    Unavailable,
    Read(Recovered),
}

/// A user's stream as read for one connection.
#[derive(Debug)]
pub struct Recovered {
    /// The id of the newest entry when it was read (`0-0`: no stream). Every
    /// message with an id up to this one was in the read.
    pub position: StreamId,
    /// For a resume: the entries after `since`, oldest first, at most the
    /// history size, as client frames.
    pub replay: Vec<(StreamId, Frame)>,
    /// For a resume: whether the entry `since` itself was read, which proves
    /// nothing after it is missing (trimming removes only the oldest entries, a
    /// lost or expired stream no longer has it, `0-0` is never an entry).
    pub complete: bool,
    /// Stored entries that could not be replayed (not a valid message).
    pub invalid: usize,
}

/// The event loop's handle to the history reader thread.
pub struct HistoryReader {
    requests: Sender<Request>,
    answers: Receiver<Answer>,
    /// Answers pushed and not yet drained.
    waiting: Arc<AtomicUsize>,
    _thread: JoinHandle<()>,
}

impl HistoryReader {
    /// Starts the thread; `waker` is the event loop's waker (one wake per batch),
    /// `pubsub` the Redis reader's status (a read counts only while it is
    /// subscribed). Redis being down is not an error here: requests are
    /// answered `Unavailable`.
    pub fn spawn(
        settings: HistorySettings,
        waker: Arc<mio::Waker>,
        pubsub: Arc<RedisStatus>,
    ) -> io::Result<HistoryReader> {
        let client = build_client(&settings.redis)?;
        let (requests, request_rx) = mpsc::channel();
        let (answer_tx, answers) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let library = library_code(settings.size, settings.ttl);
        let nodes = (settings.redis.subscribe_mode == SubscribeMode::Sharded)
            .then(|| Nodes::new(settings.redis.clone(), IO_WAIT, Some(library.clone())));
        let thread = ReaderThread {
            library,
            nodes,
            settings,
            client,
            connection: None,
            failed_at: None,
            requests: request_rx,
            answers: answer_tx,
            waiting: Arc::clone(&waiting),
            waker,
            pubsub,
            encoder: MessageEncoder::new(),
            unreadable_warnings: RateLimited::new(Duration::from_secs(10)),
            unsubscribed_warnings: RateLimited::new(Duration::from_secs(10)),
        };
        let thread = std::thread::Builder::new()
            .name("history-reader".into())
            .spawn(move || thread.run())?;
        Ok(HistoryReader {
            requests,
            answers,
            waiting,
            _thread: thread,
        })
    }

    /// Hands a request to the thread; gives it back if the thread is gone (the
    /// caller answers the connection as `Unavailable`).
    pub fn request(&self, request: Request) -> Result<(), Request> {
        self.requests.send(request).map_err(|e| e.0)
    }

    /// Whether answers wait to be drained.
    pub fn answers_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Moves every waiting answer into `out`.
    pub fn drain_answers(&self, out: &mut Vec<Answer>) {
        let before = out.len();
        out.extend(self.answers.try_iter());
        let moved = out.len() - before;
        if moved > 0 {
            self.waiting.fetch_sub(moved, Ordering::AcqRel);
        }
    }
}

struct ReaderThread {
    settings: HistorySettings,
    /// The library source with the configured size and TTL.
    library: String,
    client: Client,
    connection: Option<Connection>,
    /// Sharded mode: connections to the cluster's masters (each loads the
    /// library when opened); `client` and `connection` are then unused.
    nodes: Option<Nodes>,
    /// When the last connect (or, sharded, topology refresh) failed.
    failed_at: Option<Instant>,
    requests: Receiver<Request>,
    answers: Sender<Answer>,
    waiting: Arc<AtomicUsize>,
    waker: Arc<mio::Waker>,
    /// The Redis reader's status: whether live messages reach the loop.
    pubsub: Arc<RedisStatus>,
    encoder: MessageEncoder,
    unreadable_warnings: RateLimited,
    unsubscribed_warnings: RateLimited,
}

impl ReaderThread {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Connect (and load the function library) at start, not on the first client.
        self.check_connection();
        loop {
            match self.requests.recv_timeout(IDLE_CHECK) {
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {
                    self.check_connection();
                    continue;
                }
                // The loop is gone: the process is ending.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            batch.extend(self.requests.try_iter().take(MAX_BATCH - 1));
            // A panic (a bug) must not leave these connections without `connected`.
            let answers = match panic::catch_unwind(AssertUnwindSafe(|| self.serve(&batch))) {
                Ok(answers) => answers,
                Err(_) => {
                    warn!("history reader: a read panicked; answering the batch complete:false");
                    self.connection = None;
                    batch
                        .iter()
                        .map(|request| answer(request, Outcome::Unavailable))
                        .collect()
                }
            };
            let count = answers.len();
            for answer in answers {
                if self.answers.send(answer).is_err() {
                    return;
                }
            }
            batch.clear();
            self.waiting.fetch_add(count, Ordering::AcqRel);
            if let Err(e) = self.waker.wake() {
                warn!("history reader: cannot wake the event loop: {e}");
            }
        }
    }

    /// Opens the connection and loads the function library; false if Redis
    /// cannot be reached (retried after `RETRY_AFTER`).
    fn connect(&mut self) -> bool {
        if self.connection.is_some() {
            return true;
        }
        if self.failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
            return false;
        }
        let connected = self
            .client
            .get_connection_with_timeout(IO_WAIT)
            .and_then(|con| {
                con.set_read_timeout(Some(IO_WAIT))?;
                con.set_write_timeout(Some(IO_WAIT))?;
                Ok(con)
            });
        match connected {
            Ok(mut con) => {
                self.failed_at = None;
                // Reads work without the library; publishers need it.
                match load_library(&mut con, &self.library) {
                    Ok(_) => info!(
                        "history on: Redis function library ws_notify loaded (WS_HISTORY_SIZE={}, WS_HISTORY_TTL={:?})",
                        self.settings.size, self.settings.ttl
                    ),
                    Err(e) => warn!(
                        "history on, but the function library ws_notify could not be loaded: {e}"
                    ),
                }
                self.connection = Some(con);
                true
            }
            Err(e) => {
                warn!(
                    "history reader: cannot connect to Redis: {e}; resuming clients get complete:false"
                );
                self.failed_at = Some(Instant::now());
                false
            }
        }
    }

    /// While idle: PING the connection (reconnecting, and so reloading the
    /// library, when it is gone), or try to connect again. In sharded mode:
    /// refresh the topology (a failover or a new master) and check a
    /// connection to every master, so each has the library.
    fn check_connection(&mut self) {
        if let Some(nodes) = self.nodes.as_mut() {
            if self.failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                return;
            }
            let errors = match nodes.refresh() {
                Ok(()) => nodes.check_masters(),
                Err(e) => vec![e],
            };
            if errors.is_empty() {
                self.failed_at = None;
            } else {
                warn!("history reader: Redis Cluster: {}", errors.join("; "));
                self.failed_at = Some(Instant::now());
            }
            return;
        }
        if let Some(con) = self.connection.as_mut()
            && redis::cmd("PING").query::<String>(con).is_err()
        {
            self.connection = None;
        }
        self.connect();
    }

    /// Reads the batch (one pipeline per Redis) and answers each request.
    fn serve(&mut self, batch: &[Request]) -> Vec<Answer> {
        // Without the subscription, what is published after the read would
        // never reach these connections: no read, so no `complete` and no
        // `position` (README, History and resume).
        let replies = if !self.wait_subscribed() {
            batch.iter().map(|_| None).collect()
        } else if self.nodes.is_some() {
            self.read_sharded(batch)
        } else {
            self.read_single(batch)
        };
        batch
            .iter()
            .zip(replies)
            .map(|(request, replies)| {
                let Some(Replies { position, range }) = replies else {
                    return answer(request, Outcome::Unavailable);
                };
                let outcome = match self.recover(request, Some(position), range) {
                    Some(recovered) => Outcome::Read(recovered),
                    None => {
                        if let Some(suppressed) = self.unreadable_warnings.check(Instant::now()) {
                            warn!(
                                "history of user_id={} unreadable: the key {}{} is not a stream \
                                 written by ws_notify_publish ({suppressed} similar suppressed)",
                                request.user_id,
                                self.settings.redis.channel_prefix,
                                request.user_id
                            );
                        }
                        Outcome::Unavailable
                    }
                };
                answer(request, outcome)
            })
            .collect()
    }

    /// One pipeline for the whole batch on the one Redis. A connection found
    /// broken is replaced once (Redis restarted meanwhile). None for every
    /// request when Redis cannot be read.
    fn read_single(&mut self, batch: &[Request]) -> Vec<Option<Replies>> {
        for _ in 0..2 {
            if !self.connect() {
                break;
            }
            match self.read(batch) {
                Ok(values) => return split_replies(batch.iter(), values),
                // A slow Redis is not waited for twice.
                Err(ReadFailed::TimedOut) => break,
                Err(ReadFailed::Broken) => {}
            }
        }
        batch.iter().map(|_| None).collect()
    }

    /// Sharded mode: one pipeline per master, for the requests whose stream
    /// (key = channel name) lives in that master's slots. A request answered
    /// ASK (its slot is being migrated and the stream already moved) is asked
    /// again at the target after `ASKING`; one answered MOVED, or whose master
    /// could not be reached, again after a topology refresh (a failover, a
    /// migrated slot). Two rounds at most; None for what could not be read.
    fn read_sharded(&mut self, batch: &[Request]) -> Vec<Option<Replies>> {
        let mut replies: Vec<Option<Replies>> = batch.iter().map(|_| None).collect();
        let Some(nodes) = self.nodes.as_mut() else {
            return replies;
        };
        let prefix = &self.settings.redis.channel_prefix;
        let size = self.settings.size;
        let mut pending: Vec<(usize, Route)> =
            (0..batch.len()).map(|i| (i, Route::Owner)).collect();
        let mut key = String::new();
        for attempt in 0..2 {
            let stale = nodes.topology().masters().next().is_none();
            let rerouted = pending.iter().any(|(_, route)| *route == Route::Owner);
            if stale || (attempt > 0 && rerouted) {
                if self.failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER) {
                    break;
                }
                if let Err(e) = nodes.refresh() {
                    warn!("history reader: Redis Cluster topology: {e}");
                    self.failed_at = Some(Instant::now());
                    break;
                }
            }
            // (node, after ASKING) -> the requests read there.
            let mut by_node: BTreeMap<(NodeAddr, bool), Vec<usize>> = BTreeMap::new();
            let mut retry = Vec::new();
            for (index, route) in pending.drain(..) {
                match route {
                    Route::Asking(node) => by_node.entry((node, true)).or_default().push(index),
                    Route::Owner => {
                        key.clear();
                        key.push_str(prefix);
                        key.push_str(&batch[index].user_id);
                        match nodes.topology().master_for_key(key.as_bytes()) {
                            Some(master) => by_node
                                .entry((master.clone(), false))
                                .or_default()
                                .push(index),
                            None => retry.push((index, Route::Owner)),
                        }
                    }
                }
            }
            for ((node, asking), indexes) in by_node {
                let requests = || indexes.iter().map(|i| &batch[*i]);
                let values = nodes.connection(&node).and_then(|con| {
                    pipeline(prefix, size, asking, requests())
                        .query::<Vec<Value>>(con)
                        .map_err(|e| format!("{node}: {e}"))
                });
                let values = match values {
                    Ok(values) => values,
                    Err(e) => {
                        warn!("history reader: Redis read failed: {e}");
                        nodes.drop_connection(&node);
                        retry.extend(indexes.into_iter().map(|i| (i, Route::Owner)));
                        continue;
                    }
                };
                let split = split_replies(requests(), values);
                for (index, read) in indexes.iter().copied().zip(split) {
                    match read.as_ref().map(|read| read.redirect(&node.host)) {
                        Some(None) => replies[index] = read,
                        Some(Some(Redirect::Ask(to))) => retry.push((index, Route::Asking(to))),
                        Some(Some(Redirect::Moved(_))) | None => retry.push((index, Route::Owner)),
                    }
                }
            }
            pending = retry;
            if pending.is_empty() {
                break;
            }
        }
        debug!(
            "history read for {} connections ({} unavailable)",
            batch.len(),
            pending.len()
        );
        replies
    }

    /// Whether the Redis reader is subscribed, waiting up to `SUBSCRIBED_WAIT`
    /// for it. A read vouches for every message after its position only if the
    /// subscription was in place when it was made: the reader marks itself
    /// subscribed once Redis has confirmed `PSUBSCRIBE`, so a message published
    /// after the read reaches the loop live.
    fn wait_subscribed(&mut self) -> bool {
        let deadline = Instant::now() + SUBSCRIBED_WAIT;
        while !self.pubsub.is_subscribed() {
            let now = Instant::now();
            if now >= deadline {
                if let Some(suppressed) = self.unsubscribed_warnings.check(now) {
                    warn!(
                        "history reader: not subscribed to Redis; resuming clients get \
                         complete:false ({suppressed} similar suppressed)"
                    );
                }
                return false;
            }
            std::thread::sleep(SUBSCRIBED_CHECK);
        }
        true
    }

    /// Sends the batch's pipeline; on failure the connection is dropped.
    fn read(&mut self, batch: &[Request]) -> Result<Vec<Value>, ReadFailed> {
        let Some(con) = self.connection.as_mut() else {
            return Err(ReadFailed::Broken);
        };
        let pipe = pipeline(
            &self.settings.redis.channel_prefix,
            self.settings.size,
            false,
            batch.iter(),
        );
        match pipe.query::<Vec<Value>>(con) {
            Ok(values) => {
                debug!("history read for {} connections", batch.len());
                Ok(values)
            }
            Err(e) => {
                warn!("history reader: Redis read failed: {e}");
                self.connection = None;
                Err(if e.is_timeout() {
                    ReadFailed::TimedOut
                } else {
                    ReadFailed::Broken
                })
            }
        }
    }

    /// Builds one connection's answer from its replies; None if a reply is an
    /// error (a key that is not a stream) or not shaped like XREVRANGE's.
    fn recover(
        &mut self,
        request: &Request,
        position: Option<Value>,
        range: Option<Value>,
    ) -> Option<Recovered> {
        let newest = entries(position?)?;
        let mut position = match newest.first() {
            Some((id, _)) => *id,
            None => StreamId::ZERO,
        };
        let mut recovered = Recovered {
            position,
            replay: Vec::new(),
            complete: false,
            invalid: 0,
        };
        let Some(since) = request.since else {
            return Some(recovered);
        };
        // Newest first; at most size + 1 entries, `since` included if retained.
        let mut range = entries(range?)?;
        if let Some((id, _)) = range.first() {
            // Published between the two reads: the replay covers it.
            position = position.max(*id);
        }
        recovered.position = position;
        recovered.complete = range.last().is_some_and(|(id, _)| *id == since);
        range.retain(|(id, _)| *id > since);
        range.truncate(self.settings.size);
        for (id, message) in range.into_iter().rev() {
            let id_text = id.to_string();
            // A replayed message's timestamp is when Redis stored it (the id's time).
            let stored_at = Timestamp::from_unix_millis(id.ms);
            let frame = splice_id(&id_text, &message)
                .and_then(|spliced| self.encoder.encode_published(&spliced, &stored_at).ok());
            match frame {
                Some(frame) => recovered.replay.push((id, frame)),
                None => recovered.invalid += 1,
            }
        }
        Some(recovered)
    }
}

/// Why a batch's read failed.
enum ReadFailed {
    /// Redis did not answer within `IO_WAIT`.
    TimedOut,
    /// The connection broke (Redis restarted, or was never connected): worth
    /// one new connection at once.
    Broken,
}

/// One request's replies: the newest entry, and for a resume the range.
struct Replies {
    position: Value,
    range: Option<Value>,
}

impl Replies {
    /// A MOVED or ASK reply: the stream is (being) moved to another master.
    /// `asked` is the host of the node that answered.
    fn redirect(&self, asked: &str) -> Option<Redirect> {
        let redirect = |value: &Value| match value {
            Value::ServerError(e) => Redirect::from_error(Some(e.code()), e.details(), asked),
            _ => None,
        };
        redirect(&self.position).or_else(|| self.range.as_ref().and_then(redirect))
    }
}

/// Where a sharded read goes next.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The master of the stream's slot in the topology.
    Owner,
    /// This node, after `ASKING` (the slot is being migrated to it).
    Asking(NodeAddr),
}

/// Per request the newest entry (the position), and for a resume the newest
/// `size + 1` entries from `since` on. Errors are kept per command: one user's
/// WRONGTYPE (or MOVED) must not fail everyone's read. With `asking`, each
/// command follows an `ASKING` (which holds for one command only), whose
/// replies are left out.
fn pipeline<'a>(
    prefix: &str,
    size: usize,
    asking: bool,
    requests: impl Iterator<Item = &'a Request>,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut key = String::new();
    for request in requests {
        key.clear();
        key.push_str(prefix);
        key.push_str(&request.user_id);
        if asking {
            pipe.cmd("ASKING").ignore();
        }
        pipe.cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        if let Some(since) = request.since {
            if asking {
                pipe.cmd("ASKING").ignore();
            }
            pipe.cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg(since.to_string())
                .arg("COUNT")
                .arg(size + 1);
        }
    }
    pipe
}

/// The pipeline's replies, cut per request (only a resume sent the second
/// command). None where replies are missing.
fn split_replies<'a>(
    requests: impl Iterator<Item = &'a Request>,
    values: Vec<Value>,
) -> Vec<Option<Replies>> {
    let mut values = values.into_iter();
    requests
        .map(|request| {
            let position = values.next()?;
            let range = match request.since {
                Some(_) => Some(values.next()?),
                None => None,
            };
            Some(Replies { position, range })
        })
        .collect()
}

fn answer(request: &Request, outcome: Outcome) -> Answer {
    Answer {
        key: request.key,
        connection_id: request.connection_id,
        user_id: request.user_id.clone(),
        since: request.since,
        outcome,
    }
}

impl Request {
    /// The answer when the thread cannot be asked (it is gone).
    pub fn unavailable(self) -> Answer {
        answer(&self, Outcome::Unavailable)
    }
}

/// XREVRANGE's reply: `[[id, [field, value, ...]], ...]` -> (id, value of `m`).
/// An entry without `m` (written by something else) keeps an empty message,
/// which is counted as invalid.
fn entries(reply: Value) -> Option<Vec<(StreamId, Vec<u8>)>> {
    let Value::Array(items) = reply else {
        return None;
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let Value::BulkString(id) = pair.pop()? else {
                return None;
            };
            let id = StreamId::parse_bytes(&id)?;
            let Value::Array(fields) = fields else {
                return None;
            };
            let message = fields
                .chunks(2)
                .find_map(|field| match field {
                    [Value::BulkString(name), Value::BulkString(value)] if name == b"m" => {
                        Some(value.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            Some((id, message))
        })
        .collect()
}
