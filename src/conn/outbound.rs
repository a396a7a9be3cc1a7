//! A connection's outbound queue: every byte the server sends on a socket goes
//! through it, in order: the 101 answer, shared message frames, and the control
//! frames (pong, close) tungstenite or the server write.
//!
//! Message frames are shared (`Frame` = `Arc<[u8]>`, encoded once per message) and
//! bounded by `WS_SEND_BUFFER` frames and `WS_SEND_BUFFER_BYTES` bytes; control
//! bytes are owned and bounded separately.
//!
//! The queue also keeps the accounting of deliveries (one published message to
//! this connection, README "Endpoints"): a delivery is *written* once its last
//! byte is handed to the socket, and *unsent* when it is thrown away before that
//! (a slow client's queue, or whatever is left when the connection goes). The
//! server's own frames (`connected`, pong replies) share the bounds but are not
//! deliveries.
//!
//! A delivery carries the time its message was read from Redis; `flush` reads
//! the clock once per write system call that completes deliveries and records
//! their latency, and the bytes it writes, in the loop's `WriteMetrics`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::latency::Stamp;
use crate::message::Frame;
use crate::metrics::WriteMetrics;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Control bytes (pongs, closes, HTTP answers) queued at most; past it writers see `WouldBlock`.
pub const MAX_CONTROL_BYTES: usize = 16 * 1024;

enum Chunk {
    /// A published message's frame (a delivery), shared with the other
    /// connections it goes to, and when its message was read from Redis.
    Message(Frame, Stamp),
    /// A frame of the server's own (`connected`, a pong reply): bounded like a
    /// message, not counted as a delivery.
    Reply(Frame),
    /// Bytes only this connection sends.
    Control(Vec<u8>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Message(frame, _) | Chunk::Reply(frame) => frame,
            Chunk::Control(bytes) => bytes,
        }
    }
}

/// Deliveries that reached their end since the last [`OutboundQueue::take_deliveries`]
/// (the loop takes them after every flush, so they stay small: 32 bits keep
/// every connection's queue 8 bytes smaller).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deliveries {
    /// Frames written to the socket in full.
    pub written: u32,
    /// Frames thrown away before they were written in full.
    pub unsent: u32,
}

/// How many message frames, and how many of their bytes, a queue may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimit {
    /// `WS_SEND_BUFFER`.
    pub frames: usize,
    /// `WS_SEND_BUFFER_BYTES`; a larger frame is still taken by a queue that
    /// holds no message frame, or it could never be sent at all.
    pub bytes: usize,
}

impl FrameLimit {
    /// No bound (the first frame of a session).
    pub const NONE: FrameLimit = FrameLimit {
        frames: usize::MAX,
        bytes: usize::MAX,
    };
}

/// What a `flush` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushResult {
    /// Everything queued is written.
    Drained,
    /// The socket is full; wait for it to become writable.
    WouldBlock,
}

/// Bytes waiting to be written to one socket.
#[derive(Default)]
pub struct OutboundQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    /// Message frames queued (bounded by `WS_SEND_BUFFER`).
    messages: usize,
    /// Bytes of the message frames queued (bounded by `WS_SEND_BUFFER_BYTES`).
    message_bytes: usize,
    /// Deliveries finished since the loop last took the count.
    deliveries: Deliveries,
    /// Control bytes queued (bounded by `MAX_CONTROL_BYTES`).
    control_bytes: usize,
}

impl OutboundQueue {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Message frames waiting.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Bytes of the message frames waiting.
    pub fn message_bytes(&self) -> usize {
        self.message_bytes
    }

    /// Queues a published message's frame, read from Redis at `read_at`,
    /// unless it is over `limit`.
    pub fn push_message(&mut self, frame: Frame, read_at: Stamp, limit: FrameLimit) -> bool {
        self.push_frame(Chunk::Message(frame, read_at), limit)
    }

    /// Queues a frame of the server's own (`connected`, a pong) unless it is over `limit`.
    pub fn push_reply(&mut self, frame: Frame, limit: FrameLimit) -> bool {
        self.push_frame(Chunk::Reply(frame), limit)
    }

    fn push_frame(&mut self, chunk: Chunk, limit: FrameLimit) -> bool {
        let len = chunk.bytes().len();
        if self.messages >= limit.frames
            || (self.message_bytes > 0 && self.message_bytes + len > limit.bytes)
        {
            return false;
        }
        self.messages += 1;
        self.message_bytes += len;
        self.chunks.push_back(chunk);
        true
    }

    /// The deliveries finished since the last call, for the loop's metrics.
    pub fn take_deliveries(&mut self) -> Deliveries {
        std::mem::take(&mut self.deliveries)
    }

    /// Deliveries held outside the queue (live messages held while a session
    /// waited for `connected`) that the connection drops unsent.
    pub fn count_unsent(&mut self, deliveries: usize) {
        self.deliveries.unsent = self
            .deliveries
            .unsent
            .saturating_add(saturating_u32(deliveries));
    }

    /// The connection goes: every delivery still queued (a half-written one
    /// too) is unsent. The queue is left empty.
    pub fn discard_all(&mut self) {
        let unsent = self
            .chunks
            .iter()
            .filter(|chunk| matches!(chunk, Chunk::Message(..)))
            .count();
        self.deliveries.unsent = self
            .deliveries
            .unsent
            .saturating_add(saturating_u32(unsent));
        *self = OutboundQueue {
            deliveries: self.deliveries,
            ..OutboundQueue::default()
        };
    }

    /// Queues control bytes unless the control budget is spent.
    pub fn push_control(&mut self, bytes: &[u8]) -> bool {
        if self.control_bytes + bytes.len() > MAX_CONTROL_BYTES {
            return false;
        }
        self.control_bytes += bytes.len();
        // Append to a trailing control chunk that has not started going out, to keep chunks few.
        let front_started = self.front_written > 0 && self.chunks.len() == 1;
        if let Some(Chunk::Control(last)) = self.chunks.back_mut()
            && !front_started
        {
            last.extend_from_slice(bytes);
        } else {
            self.chunks.push_back(Chunk::Control(bytes.to_vec()));
        }
        true
    }

    /// Drops message frames that have not started going out (a frame half written
    /// must be finished, or the stream would be corrupt); the deliveries among
    /// them are counted unsent.
    pub fn discard_unsent_messages(&mut self) {
        let keep_front = usize::from(self.front_written > 0);
        let mut index = keep_front;
        while index < self.chunks.len() {
            match &self.chunks[index] {
                Chunk::Message(frame, _) | Chunk::Reply(frame) => {
                    self.messages -= 1;
                    self.message_bytes -= frame.len();
                    if matches!(self.chunks[index], Chunk::Message(..)) {
                        self.deliveries.unsent = self.deliveries.unsent.saturating_add(1);
                    }
                    self.chunks.remove(index);
                }
                Chunk::Control(_) => index += 1,
            }
        }
    }

    /// Writes as much as the socket takes, several chunks per system call, and
    /// records the bytes and the latency of the deliveries written in `writes`.
    /// Returns the bytes written and whether the queue drained.
    pub fn flush(
        &mut self,
        sink: &mut impl Write,
        writes: &mut WriteMetrics,
    ) -> io::Result<(usize, FlushResult)> {
        let mut total = 0;
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let bytes = chunk.bytes();
                slices[count] = IoSlice::new(if i == 0 {
                    &bytes[self.front_written..]
                } else {
                    bytes
                });
                count += 1;
            }
            match sink.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    total += written;
                    writes.bytes += written as u64;
                    self.consume(written, writes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((total, FlushResult::WouldBlock));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((total, FlushResult::Drained))
    }

    /// Marks `written` bytes from the front as sent; each delivery completed
    /// is observed with one clock read for the whole write.
    fn consume(&mut self, mut written: usize, writes: &mut WriteMetrics) {
        let mut written_at = None;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                return;
            };
            let remaining = front.bytes().len() - self.front_written;
            if written < remaining {
                self.front_written += written;
                return;
            }
            written -= remaining;
            self.front_written = 0;
            match self.chunks.pop_front() {
                Some(Chunk::Message(frame, read_at)) => {
                    self.messages -= 1;
                    self.message_bytes -= frame.len();
                    self.deliveries.written = self.deliveries.written.saturating_add(1);
                    let at = *written_at.get_or_insert_with(|| writes.latency.now());
                    writes.latency.observe(read_at, at);
                }
                Some(Chunk::Reply(frame)) => {
                    self.messages -= 1;
                    self.message_bytes -= frame.len();
                }
                Some(Chunk::Control(bytes)) => self.control_bytes -= bytes.len(),
                None => {}
            }
        }
        if self.chunks.is_empty() {
            // An idle connection keeps no queue memory.
            self.chunks = VecDeque::new();
        }
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::mock::MockStream;
    use std::sync::Arc;

    /// A socket that takes `per_call` bytes per write for `calls` writes, then blocks.
    fn short_writer(per_call: usize, calls: usize) -> MockStream {
        let mut sink = MockStream::new(b"");
        sink.write_chunk = per_call;
        sink.writes_left = calls;
        sink
    }

    fn frame(bytes: &[u8]) -> Frame {
        Arc::from(bytes)
    }

    /// At most `n` frames, bytes unbounded.
    fn frames(n: usize) -> FrameLimit {
        FrameLimit {
            frames: n,
            bytes: usize::MAX,
        }
    }

    #[test]
    fn bounded_by_message_limit() {
        let mut q = OutboundQueue::default();
        assert!(q.push_message(frame(b"a"), Stamp::default(), frames(2)));
        assert!(q.push_message(frame(b"b"), Stamp::default(), frames(2)));
        assert!(!q.push_message(frame(b"c"), Stamp::default(), frames(2)));
        assert_eq!(q.messages(), 2);
    }

    #[test]
    fn bounded_by_bytes_but_a_large_frame_goes_out_on_an_empty_queue() {
        let limit = FrameLimit {
            frames: 100,
            bytes: 10,
        };
        let mut q = OutboundQueue::default();
        // Control bytes do not count against the message bytes.
        q.push_control(b"HTTP/1.1 101\r\n\r\n");
        assert!(
            q.push_message(frame(&[b'x'; 25]), Stamp::default(), limit),
            "alone: taken"
        );
        assert!(
            !q.push_message(frame(b"y"), Stamp::default(), limit),
            "past the bound"
        );
        let mut sink = short_writer(usize::MAX, usize::MAX);
        q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        assert_eq!(q.message_bytes(), 0);
        assert!(q.push_message(frame(&[b'a'; 6]), Stamp::default(), limit));
        assert!(
            q.push_reply(frame(&[b'b'; 4]), limit),
            "exactly at the bound"
        );
        assert!(!q.push_message(frame(b"c"), Stamp::default(), limit));
        assert_eq!((q.messages(), q.message_bytes()), (2, 10));
    }

    #[test]
    fn deliveries_are_counted_when_written_in_full_and_replies_are_not() {
        let mut q = OutboundQueue::default();
        q.push_reply(frame(b"CONNECTED"), FrameLimit::NONE);
        q.push_message(frame(b"one"), Stamp::default(), frames(10));
        q.push_message(frame(b"two"), Stamp::default(), frames(10));
        // "CONNECTED" and "one" in full (one slice per write), then one byte of "two".
        let mut sink = short_writer(usize::MAX, 2);
        q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        sink.write_chunk = 1;
        sink.writes_left = 1;
        q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        assert_eq!(sink.written, b"CONNECTEDonet");
        assert_eq!(
            q.take_deliveries(),
            Deliveries {
                written: 1,
                unsent: 0
            }
        );
        assert_eq!(q.take_deliveries(), Deliveries::default(), "taken once");
        // The connection goes with "two" half written: unsent.
        q.discard_all();
        assert!(q.is_empty());
        assert_eq!((q.messages(), q.message_bytes()), (0, 0));
        assert_eq!(
            q.take_deliveries(),
            Deliveries {
                written: 0,
                unsent: 1
            }
        );
    }

    #[test]
    fn short_writes_keep_order_and_resume() {
        let mut q = OutboundQueue::default();
        q.push_control(b"HEAD");
        q.push_message(frame(b"one"), Stamp::default(), frames(10));
        q.push_message(frame(b"two"), Stamp::default(), frames(10));
        q.push_control(b"!");
        let mut sink = short_writer(3, 2);
        let (written, result) = q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        // The default `write_vectored` writes only the first non-empty slice: "HEA", then "D".
        assert_eq!((written, result), (4, FlushResult::WouldBlock));
        sink.writes_left = 100;
        let (_, result) = q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        assert_eq!(result, FlushResult::Drained);
        assert_eq!(sink.written, b"HEADonetwo!");
        assert!(q.is_empty());
        assert_eq!((q.messages(), q.message_bytes()), (0, 0));
        assert_eq!(q.take_deliveries().written, 2);
    }

    #[test]
    fn discard_keeps_a_half_written_frame() {
        let mut q = OutboundQueue::default();
        q.push_message(frame(b"first"), Stamp::default(), frames(10));
        q.push_message(frame(b"second"), Stamp::default(), frames(10));
        q.push_control(b"X");
        q.push_reply(frame(b"pong"), frames(10));
        q.push_message(frame(b"third"), Stamp::default(), frames(10));
        let mut sink = short_writer(2, 1);
        q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        q.discard_unsent_messages();
        assert_eq!((q.messages(), q.message_bytes()), (1, 5));
        assert_eq!(
            q.take_deliveries(),
            Deliveries {
                written: 0,
                unsent: 2
            },
            "the pong is no delivery"
        );
        sink.writes_left = 100;
        sink.write_chunk = 100;
        q.flush(&mut sink, &mut WriteMetrics::default()).unwrap();
        assert_eq!(sink.written, b"firstX");
        assert_eq!(q.take_deliveries().written, 1);
    }

    #[test]
    fn written_bytes_and_the_latency_of_written_deliveries_are_recorded() {
        let mut writes = WriteMetrics::default();
        let read_at = writes.latency.now();
        let mut q = OutboundQueue::default();
        q.push_control(b"HTTP");
        q.push_reply(frame(b"CONNECTED"), FrameLimit::NONE);
        q.push_message(frame(b"one"), read_at, frames(10));
        q.push_message(frame(b"two"), read_at, frames(10));
        // "HTTP", "CONNECTED", "one" (one slice per write), then one byte of "two".
        let mut sink = short_writer(usize::MAX, 3);
        q.flush(&mut sink, &mut writes).unwrap();
        sink.write_chunk = 1;
        sink.writes_left = 1;
        q.flush(&mut sink, &mut writes).unwrap();
        assert_eq!(writes.bytes, 17);
        assert_eq!(
            writes.latency.count(),
            1,
            "replies and half frames are not observed"
        );
        // The rest of "two" and two more in one write.
        q.push_message(frame(b"three"), read_at, frames(10));
        q.push_message(frame(b"four"), read_at, frames(10));
        let mut all = Vec::new();
        q.flush(&mut all, &mut writes).unwrap();
        assert_eq!(all, b"wothreefour");
        assert_eq!(writes.bytes, 28);
        assert_eq!(writes.latency.count(), 4);
        assert_eq!(q.take_deliveries().written, 4, "as many as observed");
    }

    #[test]
    fn control_bytes_are_bounded() {
        let mut q = OutboundQueue::default();
        assert!(q.push_control(&vec![0; MAX_CONTROL_BYTES]));
        assert!(!q.push_control(b"x"));
    }
}
