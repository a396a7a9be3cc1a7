//! The hand-over of published messages from the Redis reader thread to the
//! event loop: a bounded queue, the loop's `mio::Waker`, and the one flag that
//! keeps wakes to one per batch.
//!
//! ```text
//!  [redis-reader] Handoff::push(Published)
//!      queued += 1, queued_bytes += size (past either bound: refused, the
//!      reader counts the drop)
//!      --> unbounded mpsc
//!      --> Waker::wake(), only when `awake` was clear: the loop is asleep
//!  [event loop]   Inbox::rearm() just before it blocks (clears `awake`
//!                 unless messages wait); Inbox::has_waiting(); Inbox::drain_into()
//! ```
//!
//! The loop keeps no state of its own about the queue: it asks
//! [`Inbox::has_waiting`]. The hand-over also sets the time base (`Epoch`) that
//! both ends stamp against for the delivery latency (`crate::latency`). How the
//! pieces fit is drawn in docs/ARCHITECTURE.md.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use log::warn;

use crate::latency::{Epoch, Stamp};

/// Hand-over bound; past it messages are dropped and counted. Large enough to
/// absorb a publisher burst of a few seconds while the loop catches up (about
/// 64 MiB at 128 bytes a message, used only while a backlog exists): a smaller
/// bound drops messages, and not reading at all would let Redis' own pub/sub
/// output limit (32 MiB by default) disconnect us, which loses more.
pub const QUEUE_CAPACITY: usize = 524_288;
/// Hand-over bound in bytes (user ids and payloads), so that large messages
/// cannot make the backlog take more memory than small ones do: the message
/// bound above at 128 bytes a message. A single larger message is still taken
/// by an empty queue.
pub const QUEUE_BYTES_CAPACITY: usize = 64 << 20;
/// Most payload bytes one [`Inbox::drain_into`] moves out: the reader may refill
/// the queue while the loop works through a batch, so the batch is part of the
/// backlog's memory too. A whole batch of small messages (65,536 of 128 bytes)
/// still fits.
const DRAIN_BYTES: usize = 8 << 20;

/// One published message as handed to the event loop: the user id (the
/// channel without the prefix, checked as UTF-8 once by the reader, never
/// empty) and the raw payload, in one allocation, with the time it was read.
pub struct Published {
    /// The user id followed by the payload; the first `user_id_len` bytes are
    /// UTF-8 (they were copied from a `&str`).
    bytes: Box<[u8]>,
    user_id_len: usize,
    /// When the reader took it off the Redis connection (`Handoff::stamp`).
    read_at: Stamp,
}

impl Published {
    /// Copies `user_id` and `payload` into one allocation.
    pub fn new(user_id: &str, payload: &[u8], read_at: Stamp) -> Published {
        let mut bytes = Vec::with_capacity(user_id.len() + payload.len());
        bytes.extend_from_slice(user_id.as_bytes());
        bytes.extend_from_slice(payload);
        Published {
            bytes: bytes.into_boxed_slice(),
            user_id_len: user_id.len(),
            read_at,
        }
    }

    /// When the reader read it, for the delivery latency.
    pub fn read_at(&self) -> Stamp {
        self.read_at
    }

    /// The user id: the channel name without the prefix.
    pub fn user_id(&self) -> &str {
        let user_id = &self.bytes[..self.user_id_len];
        // SAFETY: `new` copied exactly these bytes from a `&str`, and `bytes`
        // is never changed afterwards, so they are valid UTF-8. (Checking again
        // here would cost a UTF-8 scan per message on the loop thread.)
        unsafe { std::str::from_utf8_unchecked(user_id) }
    }

    /// The message exactly as published.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.user_id_len..]
    }

    /// Bytes held: the user id and the payload.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("user_id", &self.user_id())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

/// State shared by both ends.
struct Shared {
    /// Messages sent and not yet drained; the bound is enforced on it.
    queued: AtomicUsize,
    capacity: usize,
    /// Bytes of the messages sent and not yet drained (`Published::size`).
    queued_bytes: AtomicUsize,
    byte_capacity: usize,
    /// The one flag: set by the reader when it wakes the loop, cleared by the
    /// loop just before it blocks in poll. While set, the loop is awake (or
    /// about to be) and will look at the queue, so pushes do not wake it again.
    /// Each wake is an eventfd write plus, on two cores, usually a context
    /// switch: a third of the reader's time under a flood when it was per message.
    awake: AtomicBool,
    waker: Arc<mio::Waker>,
    /// `waker.wake()` calls, for tests and diagnosis.
    wakes: AtomicU64,
    /// What `Published::read_at` counts from.
    epoch: Epoch,
}

/// The event loop's end.
pub struct Inbox {
    rx: Receiver<Published>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// True while messages are waiting: the loop should drain instead of
    /// blocking.
    pub fn has_waiting(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire) > 0
    }

    /// Moves up to `max` messages, and about `DRAIN_BYTES` at most, into `out`
    /// (a reused Vec; appended to) and returns how many. Whether more are left:
    /// [`Inbox::has_waiting`].
    pub fn drain_into(&self, out: &mut Vec<Published>, max: usize) -> usize {
        let mut moved = 0;
        let mut bytes = 0;
        while moved < max && bytes < DRAIN_BYTES {
            match self.rx.try_recv() {
                Ok(published) => {
                    bytes += published.size();
                    out.push(published);
                    moved += 1;
                }
                Err(_) => break,
            }
        }
        if moved > 0 {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.shared.queued.fetch_sub(moved, Ordering::AcqRel);
        }
        moved
    }

    /// Called by the loop just before it blocks, so that the next push wakes
    /// it. While messages wait the loop does not block (it checks
    /// [`Inbox::has_waiting`] for its poll timeout), so the flag stays set and
    /// pushes meanwhile cost no wake.
    pub fn rearm(&self) {
        if self.has_waiting() {
            return;
        }
        // A push whose swap saw the flag still set is ordered before this swap
        // (read-modify-writes of one atomic, AcqRel), so its `queued` increment
        // is visible to the loop's next `has_waiting`; a later push sees the
        // flag clear and wakes.
        self.shared.awake.swap(false, Ordering::AcqRel);
    }

    /// Messages waiting.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Bytes of the messages waiting.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Relaxed)
    }

    /// Wakes sent to the loop so far, for tests and diagnosis.
    pub fn wakes(&self) -> u64 {
        self.shared.wakes.load(Ordering::Relaxed)
    }

    /// The time base of `Published::read_at`, for the loop's write stamps.
    pub fn epoch(&self) -> Epoch {
        self.shared.epoch
    }
}

/// The reader's end.
pub struct Handoff {
    tx: Sender<Published>,
    shared: Arc<Shared>,
}

/// What [`Handoff::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    /// The queue is at its bound (messages or bytes): the message was dropped.
    Full,
    /// The Inbox is gone: the event loop has exited.
    Closed,
}

impl Handoff {
    /// Queues `published` and wakes the loop unless it is already awake.
    pub fn push(&self, published: Published) -> PushOutcome {
        // Counted before the send so the loop's decrement never runs ahead of it.
        let shared = &self.shared;
        let size = published.size();
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.capacity {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return PushOutcome::Full;
        }
        let bytes_before = shared.queued_bytes.fetch_add(size, Ordering::AcqRel);
        // A message larger than the bound still goes through an empty queue.
        if bytes_before > 0 && bytes_before + size > shared.byte_capacity {
            shared.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return PushOutcome::Full;
        }
        if self.tx.send(published).is_err() {
            shared.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return PushOutcome::Closed;
        }
        self.wake();
        PushOutcome::Queued
    }

    /// `at` (the reader's read time of a message) as a stamp for `Published::new`.
    pub fn stamp(&self, at: Instant) -> Stamp {
        self.shared.epoch.stamp(at)
    }

    /// The bound in messages, for log lines.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// The bound in bytes, for log lines.
    pub fn byte_capacity(&self) -> usize {
        self.shared.byte_capacity
    }

    fn wake(&self) {
        let shared = &self.shared;
        if !shared.awake.swap(true, Ordering::AcqRel) {
            shared.wakes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = shared.waker.wake() {
                // Practically impossible (eventfd write); the next push will
                // try again.
                warn!("cannot wake the event loop: {e}");
                shared.awake.store(false, Ordering::Release);
            }
        }
    }
}

/// A hand-over of at most `capacity` messages and `byte_capacity` bytes that
/// wakes the loop through `waker`. The channel is an unbounded std channel whose length is bounded by
/// the `queued` counter, deliberately not `sync_channel(capacity)`: std's
/// bounded channel allocates and touches every slot up front (about 2 MiB
/// resident for 65,536 slots, against a 5 MiB start budget); the list channel
/// grows in small blocks only while there is a backlog and frees them as the
/// loop drains.
pub fn channel(waker: Arc<mio::Waker>, capacity: usize, byte_capacity: usize) -> (Handoff, Inbox) {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        capacity,
        queued_bytes: AtomicUsize::new(0),
        byte_capacity,
        awake: AtomicBool::new(false),
        waker,
        wakes: AtomicU64::new(0),
        epoch: Epoch::new(),
    });
    (
        Handoff {
            tx,
            shared: Arc::clone(&shared),
        },
        Inbox { rx, shared },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token, Waker};
    use std::time::Duration;

    const WAKE: Token = Token(7);

    /// Polls once without blocking; true when the waker fired.
    fn woken(poll: &mut Poll, events: &mut Events) -> bool {
        poll.poll(events, Some(Duration::ZERO)).expect("poll");
        events.iter().any(|e| e.token() == WAKE)
    }

    #[test]
    fn coalesces_bounds_and_rearms() {
        let mut poll = Poll::new().expect("poll");
        let mut events = Events::with_capacity(8);
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
        let (handoff, inbox) = channel(waker, 10, usize::MAX);
        assert!(!inbox.has_waiting());
        for i in 0..12u8 {
            let want = if i < 10 {
                PushOutcome::Queued
            } else {
                PushOutcome::Full
            };
            assert_eq!(
                handoff.push(Published::new("u", &[i], Stamp::default())),
                want,
                "push {i}"
            );
        }
        assert_eq!(inbox.wakes(), 1, "one wake for the batch");
        assert!(woken(&mut poll, &mut events), "the real waker fired");
        assert_eq!(inbox.queued(), 10);

        let mut out = Vec::new();
        assert_eq!(inbox.drain_into(&mut out, 4), 4);
        assert!(inbox.has_waiting(), "6 left");
        // Messages wait, so re-arming keeps the flag: pushes meanwhile do not wake.
        inbox.rearm();
        assert_eq!(
            handoff.push(Published::new("u", &[10], Stamp::default())),
            PushOutcome::Queued
        );
        assert_eq!(inbox.wakes(), 1, "still awake");
        assert!(!woken(&mut poll, &mut events));
        assert_eq!(inbox.drain_into(&mut out, 100), 7);
        assert_eq!(inbox.drain_into(&mut out, 100), 0);
        assert!(!inbox.has_waiting());
        let payloads: Vec<u8> = out.iter().map(|p| p.payload()[0]).collect();
        assert_eq!(payloads, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);

        // Re-armed with nothing waiting: the next push wakes again.
        inbox.rearm();
        assert_eq!(
            handoff.push(Published::new("u", b"x", Stamp::default())),
            PushOutcome::Queued
        );
        assert_eq!(inbox.wakes(), 2);
        assert!(woken(&mut poll, &mut events));

        drop(inbox);
        assert_eq!(
            handoff.push(Published::new("u", b"x", Stamp::default())),
            PushOutcome::Closed
        );
    }

    #[test]
    fn bounded_in_bytes_but_one_large_message_passes_an_empty_queue() {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
        let (handoff, inbox) = channel(waker, 100, 10);
        // 1 + 4 bytes each: two fit, the third would pass the bound.
        assert_eq!(
            handoff.push(Published::new("u", b"aaaa", Stamp::default())),
            PushOutcome::Queued
        );
        assert_eq!(
            handoff.push(Published::new("u", b"bbbb", Stamp::default())),
            PushOutcome::Queued
        );
        assert_eq!(
            handoff.push(Published::new("u", b"cccc", Stamp::default())),
            PushOutcome::Full
        );
        assert_eq!((inbox.queued(), inbox.queued_bytes()), (2, 10));
        let mut out = Vec::new();
        assert_eq!(inbox.drain_into(&mut out, 100), 2);
        assert_eq!((inbox.queued(), inbox.queued_bytes()), (0, 0));
        let large = vec![b'x'; 100];
        assert_eq!(
            handoff.push(Published::new("u", &large, Stamp::default())),
            PushOutcome::Queued
        );
        assert_eq!(
            handoff.push(Published::new("u", b"", Stamp::default())),
            PushOutcome::Full
        );
        assert_eq!(inbox.drain_into(&mut out, 100), 1);
        assert_eq!(out[2].payload(), &large[..]);
    }

    #[test]
    fn a_drain_stops_after_its_bytes() {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).expect("waker"));
        let (handoff, inbox) = channel(waker, 100, usize::MAX);
        let half = vec![0u8; DRAIN_BYTES / 2];
        for _ in 0..3 {
            assert_eq!(
                handoff.push(Published::new("u", &half, Stamp::default())),
                PushOutcome::Queued
            );
        }
        let mut out = Vec::new();
        assert_eq!(
            inbox.drain_into(&mut out, 100),
            2,
            "past DRAIN_BYTES after two"
        );
        assert_eq!(inbox.drain_into(&mut out, 100), 1);
    }

    #[test]
    fn published_layout() {
        let p = Published::new("user:1", b"{\"type\":\"t\"}", Stamp::default());
        assert_eq!(p.user_id(), "user:1");
        assert_eq!(p.payload(), b"{\"type\":\"t\"}");
        let odd = Published::new("é\u{1F600}", b"\xff\x00", Stamp::default());
        assert_eq!(odd.user_id(), "é\u{1F600}");
        assert_eq!(odd.payload(), b"\xff\x00");
        assert_eq!(Published::new("u", b"", Stamp::default()).payload(), b"");
        assert!(format!("{p:?}").contains("user:1"));
    }
}
