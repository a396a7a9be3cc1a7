//! ws-notify: Redis pub/sub to authenticated WebSocket clients.
//!
//! ```text
//!  backend --PUBLISH user_noti:<id>--> Redis
//!                                        |
//!     PSUBSCRIBE user_noti:* or SUBSCRIBE per user  (pubsub::Link, own socket)
//!                                        v
//!  [redis reader thread] --bounded queue + one Waker wake per batch-->
//!  [event loop thread: mio Poll]
//!       listener, waker, signal pipe, Slab<Connection>
//!       hub: user_id -> connection keys --> each connection's OutboundQueue --> socket
//! ```
//!
//! Three threads: the event loop owns every socket and all per-connection
//! state; the Redis reader owns the Redis connection (`pubsub`) and only
//! hands raw messages over; `log-writer` writes the log lines the other two buffer.
//! With history on (`WS_HISTORY_SIZE`), a fourth, `history-reader`, reads
//! users' streams for resuming connections on its own Redis connection and
//! answers through the same waker (`history::reader`).
//! In the per-user subscription modes (`REDIS_SUBSCRIBE_MODE=channel`,
//! `sharded`) the loop keeps who needs which channel (`user_channels`) and
//! asks the reader to subscribe and unsubscribe through `subscriptions`.
//! In `sharded` mode (Redis Cluster) the reader holds one link per master and
//! `SSUBSCRIBE`s each channel at its slot's master; `cluster` knows the slots
//! and the topology (also for the history reader and `ws-notify publish`).
//! Messages cross through `handover` (one queue, one wake per batch); health
//! state crosses in atomics (`redis_status::RedisStatus`). The whole picture is
//! in docs/ARCHITECTURE.md.

pub mod auth;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod handover;
pub mod history;
pub mod http;
pub mod hub;
pub mod latency;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod process_stats;
pub mod pubsub;
pub mod redis_reader;
pub mod redis_status;
pub mod server;
pub mod subscriptions;
pub mod user_channels;
