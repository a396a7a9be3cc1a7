//! A lean Redis pub/sub link that owns its socket, run by the Redis reader
//! thread (docs/ARCHITECTURE.md, "Redis reader").
//!
//! - [`link`]: the connection: TCP or TLS, AUTH, commands out, events in,
//!   registered in the driving thread's `mio::Poll`.
//! - [`resp`]: an incremental RESP parser that reads push frames straight out
//!   of the read buffer, without allocating.
//!
//! Why not redis-rs's `PubSub`: it does not let us take its socket (to wait
//! on it in a mio `Poll` together with a `Waker`), and its generic parser
//! turns every message into a `Value::Array` of three `Vec`s before we copy
//! it again. redis-rs still builds our commands (`redis::cmd`).

pub mod link;
pub mod resp;
