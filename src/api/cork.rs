//! A corked writer: the HTTP/2 frames written in one turn of the connection's task leave as one
//! write, hence one TLS record and one `write` system call, instead of one of each per frame.
//!
//! h2 flushes after every DATA frame of 256 bytes or more when its transport takes vectored
//! writes (tokio-rustls does), and an issued certificate's response is ~1 KB (an HC1 string of
//! ~470–540 characters plus the COSE bytes). Without the cork every response is its own TLS
//! record (a heap buffer and an AES-GCM seal), and a unary call's HEADERS and DATA frames each
//! cost a `writev`: ~2 per certificate on each side at unary 2 × 64 (docs/benchmarks.md).
//!
//! The cork takes the bytes h2 writes into a buffer of at most one TLS record's plaintext and
//! defers the first `poll_flush` after new bytes by one turn of the scheduler (it wakes its own
//! task and answers `Pending`, as `tokio::task::yield_now` does). If h2 writes more meanwhile, the
//! flush is deferred again, up to [`MAX_TURNS`] times; the first flush that finds nothing new
//! since the last one writes the buffer and flushes the transport. So the buffer goes out as soon
//! as the connection's task has nothing more to send (one scheduler turn later), as soon as it
//! holds a full record, or after [`MAX_TURNS`] turns that each brought more: nothing waits on a
//! timer, and no bytes are held while the task is idle.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most this many bytes wait in the buffer: the largest TLS record's plaintext (RFC 8446
/// §5.1), so a full buffer is one record.
pub const CORK_LIMIT: usize = 16 * 1024;

/// At most this many scheduler turns defer a flush in a row: a task that has more to write in
/// every turn (a steady trickle of small frames) still gets its bytes out.
pub const MAX_TURNS: u8 = 8;

/// A writer that coalesces the writes of one task turn (see the module documentation). Reads
/// pass straight through.
#[derive(Debug)]
pub struct Cork<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the transport has taken (a write may be partial).
    sent: usize,
    /// Bytes were accepted since the last `poll_flush`.
    fresh: bool,
    /// Flushes deferred since the buffer was last written out.
    turns: u8,
}

impl<T> Cork<T> {
    /// Corks `inner`.
    pub fn new(inner: T) -> Self {
        Cork {
            inner,
            buf: Vec::with_capacity(CORK_LIMIT),
            sent: 0,
            fresh: false,
            turns: 0,
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> Cork<T> {
    /// Writes the whole buffer to the transport (not flushing it).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.turns = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: drains the buffer if they would not fit. `Ready(true)`:
    /// buffer them; `Ready(false)`: they fill a record on their own, write them straight through.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buf.len() + len > CORK_LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len < CORK_LIMIT))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cork<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cork<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        this.fresh = true;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        this.fresh = true;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fresh && this.turns < MAX_TURNS {
            // One more turn: whatever the task writes in it joins this write.
            this.fresh = false;
            this.turns += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.fresh = false;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// Records every write; takes at most `max` bytes per call; `blocked` answers `Pending`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        max: Option<usize>,
        blocked: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                return Poll::Pending;
            }
            let n = self.max.map_or(data.len(), |m| m.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Waker, Arc<Count>) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(c.clone()), c)
    }

    fn write(cork: &mut Cork<Recorder>, cx: &mut Context<'_>, data: &[u8]) -> usize {
        match Pin::new(cork).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("write: {other:?}"),
        }
    }

    fn flush(cork: &mut Cork<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(cork).poll_flush(cx)
    }

    #[test]
    fn writes_of_one_turn_leave_as_one_write_after_a_deferred_flush() {
        let (w, wakes) = waker();
        let mut cx = Context::from_waker(&w);
        let mut cork = Cork::new(Recorder::default());
        assert_eq!(write(&mut cork, &mut cx, b"frame one "), 10);
        // The first flush after new bytes waits one turn, and asks for it.
        assert!(flush(&mut cork, &mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(cork.get_ref().writes.is_empty());
        // The next turn writes more: deferred again.
        let slices = [io::IoSlice::new(b"frame "), io::IoSlice::new(b"two")];
        let n = Pin::new(&mut cork).poll_write_vectored(&mut cx, &slices);
        assert!(matches!(n, Poll::Ready(Ok(9))));
        assert!(flush(&mut cork, &mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        // Nothing new: one write with both frames, then the transport's flush.
        assert!(matches!(flush(&mut cork, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(cork.get_ref().writes, vec![b"frame one frame two".to_vec()]);
        assert_eq!(cork.get_ref().flushes, 1);
        // An idle flush flushes at once and writes nothing.
        assert!(matches!(flush(&mut cork, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(cork.get_ref().writes.len(), 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_task_with_more_in_every_turn_is_deferred_at_most_max_turns() {
        let (w, wakes) = waker();
        let mut cx = Context::from_waker(&w);
        let mut cork = Cork::new(Recorder::default());
        for turn in 0..MAX_TURNS {
            write(&mut cork, &mut cx, &[turn]);
            assert!(flush(&mut cork, &mut cx).is_pending(), "turn {turn}");
        }
        assert!(cork.get_ref().writes.is_empty());
        write(&mut cork, &mut cx, b"!");
        assert!(matches!(flush(&mut cork, &mut cx), Poll::Ready(Ok(()))));
        let mut expected: Vec<u8> = (0..MAX_TURNS).collect();
        expected.push(b'!');
        assert_eq!(cork.get_ref().writes, vec![expected]);
        assert_eq!(wakes.0.load(Ordering::SeqCst), MAX_TURNS as usize);
        // The count starts again with the next buffer.
        write(&mut cork, &mut cx, b"next");
        assert!(flush(&mut cork, &mut cx).is_pending());
    }

    #[test]
    fn a_full_record_goes_out_before_more_is_taken_and_large_writes_pass_through() {
        let (w, _) = waker();
        let mut cx = Context::from_waker(&w);
        let mut cork = Cork::new(Recorder::default());
        let frame = vec![7u8; 1_100];
        let mut total = 0;
        while total + frame.len() <= CORK_LIMIT {
            total += write(&mut cork, &mut cx, &frame);
        }
        assert!(cork.get_ref().writes.is_empty());
        // This one does not fit: the buffer is written first, then it is taken.
        write(&mut cork, &mut cx, &frame);
        assert_eq!(cork.get_ref().writes.len(), 1);
        assert_eq!(cork.get_ref().writes[0].len(), total);
        // A write of a whole record or more passes straight through (after the buffer).
        let big = vec![9u8; CORK_LIMIT + 5];
        assert_eq!(write(&mut cork, &mut cx, &big), CORK_LIMIT + 5);
        let writes = &cork.get_ref().writes;
        assert_eq!(writes.len(), 3);
        assert_eq!(writes[1], frame);
        assert_eq!(writes[2], big);
    }

    #[test]
    fn partial_and_blocked_transport_writes_lose_and_reorder_nothing() {
        let (w, _) = waker();
        let mut cx = Context::from_waker(&w);
        let mut cork = Cork::new(Recorder {
            max: Some(3),
            blocked: true,
            ..Recorder::default()
        });
        write(&mut cork, &mut cx, b"abcdefgh");
        assert!(flush(&mut cork, &mut cx).is_pending());
        // The transport is blocked: the flush waits, the bytes stay.
        assert!(flush(&mut cork, &mut cx).is_pending());
        assert!(cork.get_ref().writes.is_empty());
        cork.inner.blocked = false;
        assert!(matches!(flush(&mut cork, &mut cx), Poll::Ready(Ok(()))));
        let joined: Vec<u8> = cork.get_ref().writes.concat();
        assert_eq!(joined, b"abcdefgh");
        assert_eq!(cork.get_ref().writes.len(), 3);
        // Shutdown writes what is buffered first.
        write(&mut cork, &mut cx, b"xyz!");
        assert!(matches!(
            Pin::new(&mut cork).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(cork.get_ref().writes.concat(), b"abcdefghxyz!");
    }
}
