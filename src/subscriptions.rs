//! Per-user subscriptions (`REDIS_SUBSCRIBE_MODE=channel` and `sharded`): what
//! crosses between the event loop, which knows who is connected, and the Redis
//! reader thread, which holds the subscriptions.
//!
//! ```text
//!  [event loop]   Requests::subscribe(user) / unsubscribe(user) ... Requests::send()
//!      --> one Mutex<Vec<Change>> swap + one reader wake per loop turn
//!  [redis-reader] Changes::take(): SUBSCRIBE / UNSUBSCRIBE in batches
//!      --> Confirmations::push(user) once Redis confirmed the user's channel
//!      --> the loop's waker (coalesced like the hand-over's)
//!  [event loop]   Confirmed::drain_into() before the turn's messages
//! ```
//!
//! Order matters in one place: the loop drains confirmations before the
//! hand-over queue in each turn, and the reader pushes a confirmation before
//! any message it reads after it. So once the loop has sent `connected` on a
//! confirmation, every message published after it is still to come.
//! Neither side bounds these queues by dropping: a change or a confirmation is
//! a few bytes per user, and there is at most one per connect or disconnect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;

/// One change the loop asks of the reader, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The user's first connection on this instance: subscribe their channel
    /// and confirm it (again, if it is already in place).
    Subscribe(Box<str>),
    /// The user's last connection left (and the linger passed).
    Unsubscribe(Box<str>),
}

/// A queue of items, one lock per batch, and a wake that is coalesced: the
/// receiving side's waker fires only when its `awake` flag was clear.
struct Batched<T> {
    items: Mutex<Vec<T>>,
    awake: AtomicBool,
    waker: Arc<mio::Waker>,
}

impl<T> Batched<T> {
    fn new(waker: Arc<mio::Waker>) -> Batched<T> {
        Batched {
            items: Mutex::new(Vec::new()),
            awake: AtomicBool::new(false),
            waker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        // A panic while holding this lock leaves a valid Vec behind.
        self.items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push_all(&self, items: &mut Vec<T>) {
        if items.is_empty() {
            return;
        }
        self.lock().append(items);
        self.wake();
    }

    fn push(&self, item: T) {
        self.lock().push(item);
        self.wake();
    }

    fn wake(&self) {
        if !self.awake.swap(true, Ordering::AcqRel)
            && let Err(e) = self.waker.wake()
        {
            warn!("cannot wake the thread that waits for subscription changes: {e}");
            self.awake.store(false, Ordering::Release);
        }
    }

    /// Moves everything queued to `out` (appending) and clears the wake flag
    /// first, so that a push racing with this drain wakes the receiver again.
    fn drain_into(&self, out: &mut Vec<T>) -> usize {
        self.awake.store(false, Ordering::Release);
        let mut items = self.lock();
        let moved = items.len();
        out.append(&mut items);
        moved
    }

    fn has_waiting(&self) -> bool {
        !self.lock().is_empty()
    }
}

/// The loop's end for changes: collects a turn's changes, then hands them
/// over at once.
pub struct Requests {
    pending: Vec<Change>,
    shared: Arc<Batched<Change>>,
}

impl Requests {
    /// Queues a subscribe for the next [`Requests::send`].
    pub fn subscribe(&mut self, user_id: &str) {
        self.pending.push(Change::Subscribe(user_id.into()));
    }

    /// Queues an unsubscribe for the next [`Requests::send`].
    pub fn unsubscribe(&mut self, user_id: &str) {
        self.pending.push(Change::Unsubscribe(user_id.into()));
    }

    /// Hands the queued changes to the reader and wakes it (once, however
    /// many); call once per loop turn.
    pub fn send(&mut self) {
        self.shared.push_all(&mut self.pending);
    }
}

/// The reader's end for changes.
pub struct Changes {
    shared: Arc<Batched<Change>>,
}

impl Changes {
    /// Appends every change sent so far to `out`, in order.
    pub fn take(&self, out: &mut Vec<Change>) -> usize {
        self.shared.drain_into(out)
    }

    /// True while changes wait.
    pub fn has_waiting(&self) -> bool {
        self.shared.has_waiting()
    }
}

/// The reader's end for confirmations.
pub struct Confirmations {
    shared: Arc<Batched<Box<str>>>,
}

impl Confirmations {
    /// Redis confirmed this user's channel: tell the loop (wakes it unless it
    /// is awake already).
    pub fn push(&self, user_id: &str) {
        self.shared.push(user_id.into());
    }
}

/// The loop's end for confirmations.
pub struct Confirmed {
    shared: Arc<Batched<Box<str>>>,
}

impl Confirmed {
    /// Appends the users whose channel Redis confirmed since the last call.
    pub fn drain_into(&self, out: &mut Vec<Box<str>>) -> usize {
        self.shared.drain_into(out)
    }

    /// True while confirmations wait: the loop should not block.
    pub fn has_waiting(&self) -> bool {
        self.shared.has_waiting()
    }
}

/// The loop's ends of the per-user queues, as `RedisReader::spawn` returns
/// them in `channel` and `sharded` modes.
pub struct PerUser {
    /// Changes to the reader.
    pub requests: Requests,
    /// Confirmations from the reader.
    pub confirmed: Confirmed,
}

/// The two queues: changes from the loop to the reader (waking
/// `reader_waker`), confirmations back (waking `loop_waker`).
pub fn channel(
    loop_waker: Arc<mio::Waker>,
    reader_waker: Arc<mio::Waker>,
) -> (Requests, Changes, Confirmations, Confirmed) {
    let changes = Arc::new(Batched::new(reader_waker));
    let confirmations = Arc::new(Batched::new(loop_waker));
    (
        Requests {
            pending: Vec::new(),
            shared: Arc::clone(&changes),
        },
        Changes { shared: changes },
        Confirmations {
            shared: Arc::clone(&confirmations),
        },
        Confirmed {
            shared: confirmations,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token, Waker};
    use std::time::Duration;

    fn woken(poll: &mut Poll, events: &mut Events, token: Token) -> bool {
        poll.poll(events, Some(Duration::ZERO)).expect("poll");
        events.iter().any(|e| e.token() == token)
    }

    #[test]
    fn changes_keep_their_order_and_wake_once_per_batch() {
        // One waker per Poll (mio's rule): one poll per thread, as in the server.
        let (mut loop_poll, mut reader_poll) =
            (Poll::new().expect("poll"), Poll::new().expect("poll"));
        let mut events = Events::with_capacity(8);
        let token = Token(1);
        let loop_waker = Arc::new(Waker::new(loop_poll.registry(), token).expect("waker"));
        let reader_waker = Arc::new(Waker::new(reader_poll.registry(), token).expect("waker"));
        let (mut requests, changes, confirmations, confirmed) = channel(loop_waker, reader_waker);

        requests.send();
        assert!(
            !woken(&mut reader_poll, &mut events, token),
            "nothing to send"
        );
        requests.subscribe("alice");
        requests.unsubscribe("bob");
        requests.subscribe("bob");
        assert!(!changes.has_waiting(), "held until send");
        requests.send();
        requests.subscribe("carol");
        requests.send();
        assert!(woken(&mut reader_poll, &mut events, token));
        let mut out = Vec::new();
        assert_eq!(changes.take(&mut out), 4);
        assert_eq!(
            out,
            vec![
                Change::Subscribe("alice".into()),
                Change::Unsubscribe("bob".into()),
                Change::Subscribe("bob".into()),
                Change::Subscribe("carol".into()),
            ]
        );
        // The drain cleared the flag: the next send wakes again.
        requests.subscribe("dave");
        requests.send();
        assert!(woken(&mut reader_poll, &mut events, token));

        confirmations.push("alice");
        confirmations.push("carol");
        assert!(confirmed.has_waiting());
        assert!(woken(&mut loop_poll, &mut events, token));
        let mut users = Vec::new();
        assert_eq!(confirmed.drain_into(&mut users), 2);
        assert_eq!(users, vec![Box::from("alice"), Box::from("carol")]);
        assert!(!confirmed.has_waiting());
    }
}
