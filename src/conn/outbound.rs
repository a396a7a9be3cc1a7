//! A connection's outbound queue: every byte the server sends on a socket goes
//! through it, in order: the 101 answer, shared message frames, and the control
//! frames (pong, close) tungstenite or the server write.
//!
//! Message frames are shared (`Frame` = `Arc<[u8]>`, encoded once per message) and
//! counted against `WS_SEND_BUFFER`; control bytes are owned and bounded separately.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::message::Frame;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Control bytes (pongs, closes, HTTP answers) queued at most; past it writers see `WouldBlock`.
pub const MAX_CONTROL_BYTES: usize = 16 * 1024;

enum Chunk {
    /// A message frame shared with the other connections it goes to.
    Message(Frame),
    /// Bytes only this connection sends.
    Control(Vec<u8>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Message(frame) => frame,
            Chunk::Control(bytes) => bytes,
        }
    }
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

    /// Queues a message frame unless `limit` frames are already waiting.
    pub fn push_message(&mut self, frame: Frame, limit: usize) -> bool {
        if self.messages >= limit {
            return false;
        }
        self.messages += 1;
        self.chunks.push_back(Chunk::Message(frame));
        true
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
    /// must be finished, or the stream would be corrupt). Returns how many were dropped.
    pub fn discard_unsent_messages(&mut self) -> usize {
        let keep_front = usize::from(self.front_written > 0);
        let mut dropped = 0;
        let mut index = keep_front;
        while index < self.chunks.len() {
            if matches!(self.chunks[index], Chunk::Message(_)) {
                self.chunks.remove(index);
                dropped += 1;
            } else {
                index += 1;
            }
        }
        self.messages -= dropped;
        dropped
    }

    /// Writes as much as the socket takes, several chunks per system call.
    /// Returns the bytes written and whether the queue drained.
    pub fn flush(&mut self, sink: &mut impl Write) -> io::Result<(usize, FlushResult)> {
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
                    self.consume(written);
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

    /// Marks `written` bytes from the front as sent.
    fn consume(&mut self, mut written: usize) {
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
                Some(Chunk::Message(_)) => self.messages -= 1,
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

    #[test]
    fn bounded_by_message_limit() {
        let mut q = OutboundQueue::default();
        assert!(q.push_message(frame(b"a"), 2));
        assert!(q.push_message(frame(b"b"), 2));
        assert!(!q.push_message(frame(b"c"), 2));
        assert_eq!(q.messages(), 2);
    }

    #[test]
    fn short_writes_keep_order_and_resume() {
        let mut q = OutboundQueue::default();
        q.push_control(b"HEAD");
        q.push_message(frame(b"one"), 10);
        q.push_message(frame(b"two"), 10);
        q.push_control(b"!");
        let mut sink = short_writer(3, 2);
        let (written, result) = q.flush(&mut sink).unwrap();
        // The default `write_vectored` writes only the first non-empty slice: "HEA", then "D".
        assert_eq!((written, result), (4, FlushResult::WouldBlock));
        sink.writes_left = 100;
        let (_, result) = q.flush(&mut sink).unwrap();
        assert_eq!(result, FlushResult::Drained);
        assert_eq!(sink.written, b"HEADonetwo!");
        assert!(q.is_empty());
        assert_eq!(q.messages(), 0);
    }

    #[test]
    fn discard_keeps_a_half_written_frame() {
        let mut q = OutboundQueue::default();
        q.push_message(frame(b"first"), 10);
        q.push_message(frame(b"second"), 10);
        q.push_control(b"X");
        q.push_message(frame(b"third"), 10);
        let mut sink = short_writer(2, 1);
        q.flush(&mut sink).unwrap();
        assert_eq!(q.discard_unsent_messages(), 2);
        sink.writes_left = 100;
        sink.write_chunk = 100;
        q.flush(&mut sink).unwrap();
        assert_eq!(sink.written, b"firstX");
    }

    #[test]
    fn control_bytes_are_bounded() {
        let mut q = OutboundQueue::default();
        assert!(q.push_control(&vec![0; MAX_CONTROL_BYTES]));
        assert!(!q.push_control(b"x"));
    }
}
