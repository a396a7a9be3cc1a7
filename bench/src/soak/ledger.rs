//! The coordinator's ledger: which slot has which connection, which users may
//! be published to, and the expected and delivered counts of the connections
//! that ended (the rules are in the module comment of `soak`).

use crate::client::{Ended, Event};
use crate::counts::StillOpen;

/// The coordinator's view of one connection slot.
#[derive(Debug, Clone, Copy)]
pub(super) enum Slot {
    /// Connecting, or between a close and the reconnect.
    Idle,
    Open {
        generation: u64,
        w: u64,
    },
    /// Chosen for churn: its user is blocked until the close frame is out.
    Draining {
        generation: u64,
        w: u64,
        cut: u64,
    },
    /// Close frame sent; waiting for `Done`.
    Closing {
        generation: u64,
        w: u64,
        cut: u64,
    },
}

/// Who has which connections, who may be published to, and the delivered
/// and expected counts of connections that have ended.
pub(super) struct Ledger {
    pub(super) slots: Vec<Slot>,
    /// Open (not churning) connections per user, as the coordinator knows them.
    pub(super) user_open: Vec<u32>,
    /// Churning connections per user whose close frame is not out yet.
    pub(super) blocked: Vec<u32>,
    /// `seq`s published to each user, ascending.
    pub(super) seqs: Vec<Vec<u64>>,
    /// Slots in `Slot::Open`.
    pub(super) open: usize,
    pub(super) expected: u64,
    pub(super) delivered: u64,
    pub(super) missing: u64,
    pub(super) extra: u64,
    /// Connections that got fewer messages than expected.
    pub(super) short_connections: u64,
    /// Events that did not match the slot's state (a bench bug if not 0).
    pub(super) anomalies: u64,
}

impl Ledger {
    pub(super) fn new(connections: usize, users: usize) -> Ledger {
        Ledger {
            slots: vec![Slot::Idle; connections],
            user_open: vec![0; users],
            blocked: vec![0; users],
            seqs: vec![Vec::new(); users],
            open: 0,
            expected: 0,
            delivered: 0,
            missing: 0,
            extra: 0,
            short_connections: 0,
            anomalies: 0,
        }
    }

    pub(super) fn user(&self, slot: usize) -> usize {
        slot % self.user_open.len()
    }

    /// Messages to `user` with `from <= seq < to`.
    fn count(&self, user: usize, from: u64, to: u64) -> u64 {
        if to <= from {
            return 0;
        }
        let seqs = &self.seqs[user];
        (seqs.partition_point(|&s| s < to) - seqs.partition_point(|&s| s < from)) as u64
    }

    /// Books an ended connection: expected `w <= seq < end`, got `delivered`.
    fn settle(&mut self, user: usize, w: u64, end: u64, delivered: u64) {
        let expected = self.count(user, w, end);
        self.expected += expected;
        self.delivered += delivered;
        if delivered < expected {
            self.missing += expected - delivered;
            self.short_connections += 1;
        } else {
            self.extra += delivered - expected;
        }
    }

    pub(super) fn apply(&mut self, event: Event) {
        match event {
            Event::Opened {
                slot,
                generation,
                w,
            } => {
                if !matches!(self.slots[slot], Slot::Idle) {
                    self.anomalies += 1;
                }
                let user = self.user(slot);
                self.slots[slot] = Slot::Open { generation, w };
                self.user_open[user] += 1;
                self.open += 1;
            }
            Event::CloseSent { slot, generation } => match self.slots[slot] {
                Slot::Draining {
                    generation: g,
                    w,
                    cut,
                } if g == generation => {
                    let user = self.user(slot);
                    self.blocked[user] -= 1;
                    self.slots[slot] = Slot::Closing { generation, w, cut };
                }
                _ => self.anomalies += 1,
            },
            Event::Done {
                slot,
                generation,
                delivered,
                ended,
            } => {
                let user = self.user(slot);
                let lost_at = match ended {
                    Ended::Lost { issued } => issued,
                    Ended::Churned => u64::MAX,
                };
                let (g, w, end) = match self.slots[slot] {
                    Slot::Open { generation: g, w } => {
                        self.user_open[user] -= 1;
                        self.open -= 1;
                        (g, w, lost_at)
                    }
                    Slot::Draining {
                        generation: g,
                        w,
                        cut,
                    } => {
                        self.blocked[user] -= 1;
                        (g, w, cut.min(lost_at))
                    }
                    Slot::Closing {
                        generation: g,
                        w,
                        cut,
                    } => (g, w, cut.min(lost_at)),
                    Slot::Idle => {
                        self.anomalies += 1;
                        return;
                    }
                };
                if g != generation || end == u64::MAX {
                    self.anomalies += 1;
                }
                self.settle(user, w, end, delivered);
                self.slots[slot] = Slot::Idle;
            }
        }
    }

    /// Books a connection still open at the end of the run.
    pub(super) fn settle_open(&mut self, still: StillOpen, issued: u64) {
        let user = self.user(still.slot);
        let (g, w, end) = match self.slots[still.slot] {
            Slot::Open { generation, w } => (generation, w, issued),
            Slot::Draining { generation, w, cut } | Slot::Closing { generation, w, cut } => {
                (generation, w, cut)
            }
            Slot::Idle => {
                self.anomalies += 1;
                return;
            }
        };
        if g != still.generation {
            self.anomalies += 1;
        }
        self.settle(user, w, end, still.delivered);
        self.slots[still.slot] = Slot::Idle;
    }

    /// Expected so far, ended connections plus the live ones up to `issued`.
    pub(super) fn expected_now(&self, issued: u64) -> u64 {
        let live: u64 = self
            .slots
            .iter()
            .enumerate()
            .map(|(slot, s)| match *s {
                Slot::Idle => 0,
                Slot::Open { w, .. } => self.count(self.user(slot), w, issued),
                Slot::Draining { w, cut, .. } | Slot::Closing { w, cut, .. } => {
                    self.count(self.user(slot), w, cut)
                }
            })
            .sum();
        self.expected + live
    }

    /// The next user after `cursor` (round robin) with an open connection
    /// and no connection being closed.
    pub(super) fn pick_user(&self, cursor: &mut usize) -> Option<usize> {
        let users = self.user_open.len();
        for _ in 0..users {
            let user = *cursor;
            *cursor = (*cursor + 1) % users;
            if self.user_open[user] > 0 && self.blocked[user] == 0 {
                return Some(user);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_is_the_window_between_open_and_cut() {
        // 4 slots, 2 users: slots 0 and 2 are user 0, 1 and 3 are user 1.
        let mut l = Ledger::new(4, 2);
        for slot in 0..4 {
            l.apply(Event::Opened {
                slot,
                generation: 1,
                w: if slot == 2 { 3 } else { 0 },
            });
        }
        assert_eq!(l.open, 4);
        // Messages 0..6 alternate users 0, 1.
        for seq in 0..6 {
            l.seqs[(seq % 2) as usize].push(seq);
        }
        // Slot 0 churns at cut 4 (user 0 got 0 and 2 before it).
        l.slots[0] = Slot::Draining {
            generation: 1,
            w: 0,
            cut: 4,
        };
        l.user_open[0] -= 1;
        l.blocked[0] += 1;
        l.open -= 1;
        let mut cursor = 0;
        assert_eq!(l.pick_user(&mut cursor), Some(1), "user 0 is blocked");
        l.apply(Event::CloseSent {
            slot: 0,
            generation: 1,
        });
        assert_eq!(l.blocked[0], 0);
        l.apply(Event::Done {
            slot: 0,
            generation: 1,
            delivered: 2,
            ended: Ended::Churned,
        });
        assert_eq!((l.expected, l.delivered, l.missing), (2, 2, 0));
        // Slot 2 opened at w = 3: of user 0's 0, 2, 4 only 4 is expected.
        assert_eq!(l.expected_now(6), 2 + 3 + 1 + 3);
        // Slot 1 (user 1: 1, 3, 5) is lost when issued = 4: 1 and 3 expected.
        l.apply(Event::Done {
            slot: 1,
            generation: 1,
            delivered: 1,
            ended: Ended::Lost { issued: 4 },
        });
        assert_eq!((l.expected, l.missing, l.short_connections), (4, 1, 1));
        l.settle_open(
            StillOpen {
                slot: 2,
                generation: 1,
                delivered: 2,
            },
            6,
        );
        assert_eq!((l.expected, l.extra), (5, 1));
        assert_eq!(l.anomalies, 0);
    }
}
