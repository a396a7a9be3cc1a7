//! Which users' channels this instance needs in the per-user subscription modes
//! (`REDIS_SUBSCRIBE_MODE=channel` or `sharded`; README, "Subscription modes"):
//! the event loop's side of the subscriptions the Redis reader holds. Owned by
//! the event loop thread (no locks); it talks to the reader through the queues
//! of `subscriptions` (`PerUser`). In pattern mode the loop has none of this.
//!
//! One entry per user with a connection here, or lingering after its last one:
//!
//! ```text
//!  (none) --connection: SUBSCRIBE asked--> Pending { waiting }
//!  Pending --Redis confirmed--> Confirmed        (the waiting connections are released)
//!  Pending --every waiting connection left--> Lingering { confirmed: false }
//!  Confirmed --last connection left--> Lingering { confirmed: true }
//!  Lingering --confirmed--> Lingering { confirmed: true }
//!  Lingering --connection--> Confirmed (it opens at once) or Pending (nothing asked again)
//!  Lingering --until passed: UNSUBSCRIBE asked--> (none)
//! ```
//!
//! Changes are touched per connect and disconnect, never per message. The
//! changes of a loop turn go to the reader at once (`UserChannels::send`), so a
//! connect storm is one batch. A connection that waits is also bounded by a
//! deadline of its own (`Connection::open_awaiting_subscription`, close 1013).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::history::StreamId;
use crate::subscriptions::{Confirmed, PerUser, Requests};

/// Lingers expired per loop turn at most; the rest wait for the next turn
/// (`UserChannels::next_deadline` is then already due, so the loop does not block).
pub const MAX_EXPIRIES_PER_TURN: usize = 4096;

/// A connection waiting for its user's channel to be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    /// Slab key.
    pub key: usize,
    /// Tells a reused slab key apart.
    pub connection_id: u64,
    /// The client's `since` (resume), for the `connected` it gets once released.
    pub since: Option<StreamId>,
}

/// What an authenticated upgrade does, as far as the user's channel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The channel is confirmed: `connected` as in pattern mode.
    Open,
    /// Wait for the confirmation (a SUBSCRIBE is in flight).
    Wait,
    /// Shutting down and nothing is in flight: nothing new is subscribed, the
    /// connection is closed like the others (1001).
    Refuse,
}

/// One user's channel.
#[derive(Debug)]
enum Channel {
    /// SUBSCRIBE asked of the reader, not yet confirmed; these connections
    /// wait (every connection of the user here waits).
    Pending { waiting: Vec<Waiter> },
    /// Redis confirmed the channel; the user has connections here.
    Confirmed,
    /// No connection left: UNSUBSCRIBE at `until` unless one comes back.
    /// `confirmed` false while the SUBSCRIBE asked earlier is still in flight.
    Lingering { until: Instant, confirmed: bool },
}

/// The users whose channels this instance needs, and the loop's ends of the
/// queues to the Redis reader.
pub struct UserChannels {
    users: HashMap<Rc<str>, Channel>,
    /// (until, user) of each linger in the order they began: one linger
    /// duration for all, so this is deadline order too. An entry whose user
    /// came back (or lingers again, until later) is stale and skipped.
    lingering: VecDeque<(Instant, Rc<str>)>,
    /// `REDIS_UNSUBSCRIBE_LINGER`.
    linger: Duration,
    requests: Requests,
    confirmed: Confirmed,
    /// Reused buffer for one drain of confirmations.
    confirmations: Vec<Box<str>>,
}

impl UserChannels {
    pub fn new(queues: PerUser, linger: Duration) -> UserChannels {
        UserChannels {
            users: HashMap::new(),
            lingering: VecDeque::new(),
            linger,
            requests: queues.requests,
            confirmed: queues.confirmed,
            confirmations: Vec::new(),
        }
    }

    /// An authenticated upgrade of `user_id`. A confirmed channel opens at
    /// once (a linger is cancelled); otherwise the connection waits, and the
    /// first one asks the reader to subscribe (unless `may_subscribe` is false:
    /// shutting down).
    pub fn admit(&mut self, user_id: &Rc<str>, waiter: Waiter, may_subscribe: bool) -> Admission {
        let Some(channel) = self.users.get_mut(user_id) else {
            if !may_subscribe {
                return Admission::Refuse;
            }
            self.requests.subscribe(user_id);
            self.users.insert(
                Rc::clone(user_id),
                Channel::Pending {
                    waiting: vec![waiter],
                },
            );
            return Admission::Wait;
        };
        match channel {
            Channel::Confirmed => Admission::Open,
            Channel::Pending { waiting } => {
                waiting.push(waiter);
                Admission::Wait
            }
            Channel::Lingering {
                confirmed: true, ..
            } => {
                *channel = Channel::Confirmed;
                Admission::Open
            }
            Channel::Lingering {
                confirmed: false, ..
            } => {
                *channel = Channel::Pending {
                    waiting: vec![waiter],
                };
                Admission::Wait
            }
        }
    }

    /// A connection of `user_id` ended (`last`: the user has no other one
    /// here). A waiting one stops waiting; after the last one the channel
    /// lingers.
    pub fn left(
        &mut self,
        user_id: &str,
        key: usize,
        connection_id: u64,
        last: bool,
        now: Instant,
    ) {
        let Some(user) = self.users.get_key_value(user_id).map(|(u, _)| Rc::clone(u)) else {
            return; // refused during shutdown: never admitted
        };
        let Some(channel) = self.users.get_mut(&user) else {
            return;
        };
        let confirmed = match channel {
            Channel::Pending { waiting } => {
                waiting.retain(|w| (w.key, w.connection_id) != (key, connection_id));
                debug_assert_eq!(waiting.is_empty(), last, "every connection waits");
                false
            }
            Channel::Confirmed => true,
            Channel::Lingering { .. } => {
                debug_assert!(false, "a lingering user has no connection");
                return;
            }
        };
        if !last {
            return;
        }
        let until = now + self.linger;
        *channel = Channel::Lingering { until, confirmed };
        self.lingering.push_back((until, user));
    }

    /// True while confirmations from the reader wait: the loop must not block.
    pub fn confirmations_waiting(&self) -> bool {
        self.confirmed.has_waiting()
    }

    /// Takes the reader's confirmations (drain them before the hand-over
    /// inbox: see `subscriptions`) and appends the connections they release,
    /// with their user, to `released`. A confirmation for a user that is
    /// confirmed already or gone (a resubscription after a Redis reconnect,
    /// or one that crossed an UNSUBSCRIBE) changes nothing.
    pub fn take_confirmed(&mut self, released: &mut Vec<(Rc<str>, Waiter)>) {
        let mut confirmations = std::mem::take(&mut self.confirmations);
        self.confirmed.drain_into(&mut confirmations);
        for user_id in confirmations.drain(..) {
            let Some(channel) = self.users.get_mut(&*user_id) else {
                continue;
            };
            match channel {
                Channel::Pending { waiting } => {
                    let waiting = std::mem::take(waiting);
                    *channel = Channel::Confirmed;
                    if let Some((user, _)) = self.users.get_key_value(&*user_id) {
                        released.extend(waiting.into_iter().map(|w| (Rc::clone(user), w)));
                    }
                }
                Channel::Lingering { confirmed, .. } => *confirmed = true,
                Channel::Confirmed => {}
            }
        }
        self.confirmations = confirmations;
    }

    /// Forgets the users whose linger passed by `now` (at most
    /// [`MAX_EXPIRIES_PER_TURN`]), asking the reader to unsubscribe them.
    pub fn expire(&mut self, now: Instant) {
        for _ in 0..MAX_EXPIRIES_PER_TURN {
            let Some((until, _)) = self.lingering.front() else {
                return;
            };
            if *until > now {
                return;
            }
            let Some((until, user)) = self.lingering.pop_front() else {
                return;
            };
            if let Some(Channel::Lingering { until: current, .. }) = self.users.get(&user)
                && *current == until
            {
                self.users.remove(&user);
                self.requests.unsubscribe(&user);
            }
        }
    }

    /// When the next linger ends (stale entries included: waking for one
    /// costs a pop).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lingering.front().map(|(until, _)| *until)
    }

    /// Hands this turn's subscribes and unsubscribes to the reader (one lock,
    /// one wake); once per loop turn, after the events.
    pub fn send(&mut self) {
        self.requests.send();
    }

    /// Users with an entry (connected here, or lingering).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::{self, Change, Changes, Confirmations};
    use mio::{Poll, Token, Waker};
    use std::sync::Arc;

    const LINGER: Duration = Duration::from_secs(5);

    /// The loop's side under test, and the reader's ends, which the test plays.
    struct Harness {
        channels: UserChannels,
        changes: Changes,
        confirmations: Confirmations,
        // The polls the wakers are registered with must outlive them.
        _polls: (Poll, Poll),
    }

    impl Harness {
        fn new() -> Harness {
            let (loop_poll, reader_poll) = (Poll::new().expect("poll"), Poll::new().expect("poll"));
            let loop_waker = Arc::new(Waker::new(loop_poll.registry(), Token(0)).expect("waker"));
            let reader_waker =
                Arc::new(Waker::new(reader_poll.registry(), Token(0)).expect("waker"));
            let (requests, changes, confirmations, confirmed) =
                subscriptions::channel(loop_waker, reader_waker);
            Harness {
                channels: UserChannels::new(
                    PerUser {
                        requests,
                        confirmed,
                    },
                    LINGER,
                ),
                changes,
                confirmations,
                _polls: (loop_poll, reader_poll),
            }
        }

        /// What the reader receives after the loop's `send`.
        fn sent(&mut self) -> Vec<Change> {
            self.channels.send();
            let mut out = Vec::new();
            self.changes.take(&mut out);
            out
        }

        fn confirm(&mut self, user: &str) -> Vec<(Rc<str>, Waiter)> {
            self.confirmations.push(user);
            assert!(self.channels.confirmations_waiting());
            let mut released = Vec::new();
            self.channels.take_confirmed(&mut released);
            assert!(!self.channels.confirmations_waiting());
            released
        }
    }

    fn waiter(key: usize) -> Waiter {
        Waiter {
            key,
            connection_id: key as u64 + 100,
            since: None,
        }
    }

    fn subscribe(user: &str) -> Change {
        Change::Subscribe(user.into())
    }

    fn unsubscribe(user: &str) -> Change {
        Change::Unsubscribe(user.into())
    }

    #[test]
    fn one_subscribe_per_user_however_many_connections_wait() {
        let mut h = Harness::new();
        let (alice, bob): (Rc<str>, Rc<str>) = ("alice".into(), "bob".into());
        for key in 0..3 {
            assert_eq!(h.channels.admit(&alice, waiter(key), true), Admission::Wait);
        }
        assert_eq!(h.channels.admit(&bob, waiter(3), true), Admission::Wait);
        assert_eq!(h.sent(), vec![subscribe("alice"), subscribe("bob")]);
        assert_eq!(h.channels.admit(&alice, waiter(4), true), Admission::Wait);
        assert_eq!(h.sent(), vec![], "still in flight: not asked again");

        // The confirmation releases every waiting connection of the user, once.
        let released = h.confirm("alice");
        let keys: Vec<usize> = released.iter().map(|(_, w)| w.key).collect();
        assert_eq!(keys, vec![0, 1, 2, 4]);
        assert!(released.iter().all(|(user, _)| &**user == "alice"));
        assert!(h.confirm("alice").is_empty(), "a repeat releases nothing");
        // Now confirmed: a new connection opens at once, nothing is asked.
        assert_eq!(h.channels.admit(&alice, waiter(5), true), Admission::Open);
        assert_eq!(h.sent(), vec![]);
        // Bob still waits.
        assert_eq!(h.confirm("bob"), vec![(bob, waiter(3))]);
    }

    #[test]
    fn the_last_connection_lingers_then_unsubscribes_and_is_forgotten() {
        let mut h = Harness::new();
        let start = Instant::now();
        let alice: Rc<str> = "alice".into();
        let _ = h.channels.admit(&alice, waiter(1), true);
        let _ = h.channels.admit(&alice, waiter(2), true);
        let _ = h.confirm("alice");
        let _ = h.sent();
        h.channels.left("alice", 1, 101, false, start);
        assert_eq!(h.channels.next_deadline(), None, "one connection is left");
        h.channels.left("alice", 2, 102, true, start);
        assert_eq!(h.channels.next_deadline(), Some(start + LINGER));
        h.channels.expire(start + LINGER - Duration::from_millis(1));
        assert_eq!(h.sent(), vec![], "not before the linger passed");
        h.channels.expire(start + LINGER);
        assert_eq!(h.sent(), vec![unsubscribe("alice")]);
        assert_eq!(h.channels.user_count(), 0, "forgotten");
        assert_eq!(h.channels.next_deadline(), None);
        // A confirmation that crossed the unsubscribe changes nothing.
        assert!(h.confirm("alice").is_empty());
        assert_eq!(h.channels.user_count(), 0);
    }

    #[test]
    fn a_reconnect_during_the_linger_finds_the_channel_confirmed() {
        let mut h = Harness::new();
        let start = Instant::now();
        let alice: Rc<str> = "alice".into();
        let _ = h.channels.admit(&alice, waiter(1), true);
        let _ = h.confirm("alice");
        h.channels.left("alice", 1, 101, true, start);
        let back = start + LINGER / 2;
        assert_eq!(h.channels.admit(&alice, waiter(2), true), Admission::Open);
        // The old linger's entry is stale: nothing happens at its time.
        h.channels.expire(start + LINGER);
        assert_eq!(h.sent(), vec![subscribe("alice")], "only the first one");
        assert_eq!(h.channels.user_count(), 1);
        // Leaving again lingers from then on.
        h.channels.left("alice", 2, 102, true, back);
        h.channels.expire(start + LINGER);
        assert_eq!(h.sent(), vec![]);
        h.channels.expire(back + LINGER);
        assert_eq!(h.sent(), vec![unsubscribe("alice")]);
    }

    #[test]
    fn waiters_that_leave_before_the_confirmation_linger_unconfirmed() {
        let mut h = Harness::new();
        let start = Instant::now();
        let alice: Rc<str> = "alice".into();
        let _ = h.channels.admit(&alice, waiter(1), true);
        let _ = h.channels.admit(&alice, waiter(2), true);
        // One gave up (1013) or went away: the other still waits.
        h.channels.left("alice", 1, 101, false, start);
        assert_eq!(h.confirm("alice"), vec![(Rc::clone(&alice), waiter(2))]);

        let bob: Rc<str> = "bob".into();
        let _ = h.channels.admit(&bob, waiter(3), true);
        h.channels.left("bob", 3, 103, true, start);
        // Back before the confirmation: waits, without asking again.
        assert_eq!(h.channels.admit(&bob, waiter(4), true), Admission::Wait);
        assert_eq!(h.sent(), vec![subscribe("alice"), subscribe("bob")]);
        h.channels.left("bob", 4, 104, true, start);
        // Confirmed while lingering: a connection then opens at once.
        assert!(h.confirm("bob").is_empty());
        assert_eq!(h.channels.admit(&bob, waiter(5), true), Admission::Open);
        h.channels.left("bob", 5, 105, true, start);
        // Never confirmed: unsubscribed all the same when the linger ends.
        let carol: Rc<str> = "carol".into();
        let _ = h.channels.admit(&carol, waiter(6), true);
        h.channels.left("carol", 6, 106, true, start);
        h.channels.expire(start + LINGER);
        assert_eq!(
            h.sent(),
            vec![subscribe("carol"), unsubscribe("bob"), unsubscribe("carol")]
        );
        assert_eq!(h.channels.user_count(), 1, "only alice");
    }

    #[test]
    fn an_unsubscribe_then_a_resubscribe_reach_the_reader_in_that_order() {
        let mut h = Harness::new();
        let start = Instant::now();
        let alice: Rc<str> = "alice".into();
        let _ = h.channels.admit(&alice, waiter(1), true);
        let _ = h.confirm("alice");
        let _ = h.sent();
        h.channels.left("alice", 1, 101, true, start);
        // In one turn: the linger ends, then alice comes back.
        h.channels.expire(start + LINGER);
        assert_eq!(h.channels.admit(&alice, waiter(2), true), Admission::Wait);
        assert_eq!(h.sent(), vec![unsubscribe("alice"), subscribe("alice")]);
        assert_eq!(h.confirm("alice"), vec![(alice, waiter(2))]);
    }

    #[test]
    fn shutting_down_subscribes_nothing_new() {
        let mut h = Harness::new();
        let (alice, bob): (Rc<str>, Rc<str>) = ("alice".into(), "bob".into());
        let _ = h.channels.admit(&alice, waiter(1), true);
        let _ = h.confirm("alice");
        let _ = h.sent();
        assert_eq!(h.channels.admit(&alice, waiter(2), false), Admission::Open);
        assert_eq!(h.channels.admit(&bob, waiter(3), false), Admission::Refuse);
        assert_eq!(h.sent(), vec![]);
        // A refused connection was never admitted: its end changes nothing.
        h.channels.left("bob", 3, 103, true, Instant::now());
        assert_eq!(h.channels.user_count(), 1);
    }

    #[test]
    fn expiry_work_per_turn_is_bounded() {
        let mut h = Harness::new();
        let start = Instant::now();
        let users: Vec<Rc<str>> = (0..MAX_EXPIRIES_PER_TURN + 10)
            .map(|i| Rc::from(format!("u{i}")))
            .collect();
        for (key, user) in users.iter().enumerate() {
            let _ = h.channels.admit(user, waiter(key), true);
            h.channels.left(user, key, key as u64 + 100, true, start);
        }
        let _ = h.sent();
        let at = start + LINGER;
        h.channels.expire(at);
        assert_eq!(h.sent().len(), MAX_EXPIRIES_PER_TURN);
        assert!(
            h.channels.next_deadline().is_some_and(|next| next <= at),
            "the rest are due: the loop must not block"
        );
        h.channels.expire(at);
        assert_eq!(h.sent().len(), 10);
        assert_eq!(h.channels.user_count(), 0);
    }
}
