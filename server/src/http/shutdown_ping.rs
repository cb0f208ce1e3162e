//! [`HoldShutdownPong`]: hands the client's answer to the graceful-shutdown
//! PING to hyper only after the streams the client opened before it.
//!
//! The two-step GOAWAY rests on one assumption: whatever the client sent
//! before it read the first GOAWAY arrives before its answer to the PING
//! that followed, so the last stream id computed on that answer covers it.
//! The Rust `h2` client (hyper's, so tonic's) breaks it: it writes the
//! PING answer as soon as it reads the PING, ahead of the HEADERS of
//! streams it had already opened but not yet flushed. `h2`'s server sends
//! the final GOAWAY the moment the answer is read, and the HEADERS right
//! behind it in the same segment name a stream above its last stream id:
//! refused, and a failed call for a client that does not retry (3 of 7114
//! calls over 10 reloads in the gRPC end-to-end test, before this).
//!
//! So on an HTTP/2 connection this sits between the socket and hyper, walks
//! the frame headers of what the client sends, and takes the PING answer
//! carrying `h2`'s shutdown payload out of the byte stream. It puts it back
//! [`HOLD`] later, at a frame boundary outside a header block, after the
//! frames that arrived behind it. Nothing else is changed or reordered;
//! the cost is that the final GOAWAY goes out `HOLD` later, during which
//! the client opens no stream on this connection (it has the first GOAWAY).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

/// How long the PING answer is held back. Well above the time between the
/// `h2` client writing the answer and flushing the streams it had queued
/// (the same write, as a rule), and small against a drain.
pub(super) const HOLD: Duration = Duration::from_millis(50);

/// The PING payload `h2` sends with the first GOAWAY of a graceful shutdown.
const SHUTDOWN_PAYLOAD: [u8; 8] = [0x0b, 0x7b, 0xa2, 0xf0, 0x8b, 0x9b, 0xfe, 0x54];
const PREFACE_LEN: usize = 24;
const FRAME_HEAD: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

pub(super) struct HoldShutdownPong<IO> {
    inner: IO,
    /// Preface bytes still to pass before the first frame.
    preface_left: usize,
    /// A frame head being assembled across reads.
    head: Vec<u8>,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
    /// Between a HEADERS (or PUSH_PROMISE) without END_HEADERS and the
    /// CONTINUATION that ends it: no frame may be put in between.
    in_header_block: bool,
    /// A PING answer being captured (head and payload).
    capture: Option<Vec<u8>>,
    /// The shutdown PING answer, and when it may go on to hyper.
    held: Option<(Vec<u8>, Pin<Box<Sleep>>)>,
    /// Bytes read and passed on, not yet handed to hyper.
    out: BytesMut,
}

impl<IO> HoldShutdownPong<IO> {
    /// `io` must begin with the HTTP/2 connection preface.
    pub fn new(io: IO) -> Self {
        HoldShutdownPong {
            inner: io,
            preface_left: PREFACE_LEN,
            head: Vec::with_capacity(FRAME_HEAD),
            payload_left: 0,
            in_header_block: false,
            capture: None,
            held: None,
            out: BytesMut::new(),
        }
    }

    /// Between frames, outside a header block: a whole frame may go here.
    fn at_boundary(&self) -> bool {
        self.preface_left == 0
            && self.head.is_empty()
            && self.payload_left == 0
            && self.capture.is_none()
            && !self.in_header_block
    }

    /// Passes `chunk` on to `out`, frame by frame, taking out the shutdown
    /// PING answer.
    fn scan(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(chunk.len());
                self.out.extend_from_slice(&chunk[..n]);
                self.preface_left -= n;
                chunk = &chunk[n..];
            } else if let Some(capture) = &mut self.capture {
                let n = self.payload_left.min(chunk.len());
                capture.extend_from_slice(&chunk[..n]);
                self.payload_left -= n;
                chunk = &chunk[n..];
                if self.payload_left == 0 {
                    let frame = self.capture.take().unwrap_or_default();
                    if frame[FRAME_HEAD..] == SHUTDOWN_PAYLOAD[..] && self.held.is_none() {
                        self.held = Some((frame, Box::pin(sleep(HOLD))));
                    } else {
                        self.out.extend_from_slice(&frame);
                    }
                }
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(chunk.len());
                self.out.extend_from_slice(&chunk[..n]);
                self.payload_left -= n;
                chunk = &chunk[n..];
            } else {
                let n = (FRAME_HEAD - self.head.len()).min(chunk.len());
                self.head.extend_from_slice(&chunk[..n]);
                chunk = &chunk[n..];
                if self.head.len() < FRAME_HEAD {
                    continue;
                }
                let head = std::mem::take(&mut self.head);
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                match kind {
                    HEADERS | PUSH_PROMISE | CONTINUATION => {
                        self.in_header_block = flags & END_HEADERS == 0;
                    }
                    _ => {}
                }
                self.payload_left = len;
                if kind == PING && flags & ACK != 0 && len == SHUTDOWN_PAYLOAD.len() {
                    self.capture = Some(head);
                } else {
                    self.out.extend_from_slice(&head);
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HoldShutdownPong<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            // The held answer goes on once its time is up, between frames.
            let due = match &mut this.held {
                Some((_, timer)) => timer.as_mut().poll(cx).is_ready(),
                None => false,
            };
            if due && this.at_boundary() {
                if let Some((frame, _)) = this.held.take() {
                    this.out.extend_from_slice(&frame);
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of the stream: an answer still held goes first.
                    if let Some((frame, _)) = this.held.take() {
                        this.out.extend_from_slice(&frame);
                        continue;
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().to_vec();
                    this.scan(&filled);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HoldShutdownPong<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
