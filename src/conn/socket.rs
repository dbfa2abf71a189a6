//! A WebSocket on the bare TCP stream, once the HTTP upgrade has been answered.
//!
//! actix-http's HTTP/1 dispatcher keeps an 8 KiB read buffer and a write buffer that only grows,
//! for as long as a connection lives: ~22 KiB of the ~24 KiB an idle socket used to cost. So the
//! upgraded stream is taken out of actix-http (see `http::upgrade`) and split in two halves:
//! [`Incoming`] decodes the client's frames for the connection actor, and [`FrameWriter`]
//! encodes the server's. Both hold a buffer only while bytes move and give it back before they
//! wait, so an idle socket costs its actor and a few small allocations.
//!
//! [`Incoming`] also aggregates fragmented messages up to a bound, answers pings (through the
//! connection's outbound queue, see [`Pongs`]) and ends when the writer has stopped, so a
//! socket the server gave up on or closed is never read on.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_codec::{Decoder as _, Encoder as _};
use actix_http::ws::{self, Codec, Frame, Item};
pub use actix_http::ws::{CloseCode, CloseReason, ProtocolError};
use bytes::{Buf as _, Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

/// How much room a read asks for. The buffer is dropped again whenever it is empty and the
/// socket has nothing more to read.
const READ_CHUNK: usize = 8 * 1024;

/// RFC 6455 caps a control frame's payload at 125 bytes; a close frame's code takes two of them.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// One complete message from the client.
#[derive(Debug)]
pub enum Received {
    Text(ByteString),
    Binary(Bytes),
    /// Already answered with a pong.
    Ping(Bytes),
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// Where [`Incoming`] sends the pong that answers a ping: the connection's outbound queue, so
/// it goes out in order with everything else.
pub trait Pongs: Unpin {
    fn pong(&self, payload: Bytes);
}

/// The parts of an upgraded connection.
pub struct Upgraded {
    pub incoming: Incoming,
    pub writer: FrameWriter,
}

/// Splits an upgraded stream. `leftover` is what the client sent after its upgrade request and
/// the HTTP codec had already read; `max_message` bounds a frame and an aggregated message.
pub fn split(io: TcpStream, leftover: BytesMut, max_message: usize) -> Upgraded {
    let (read, write) = io.into_split();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    Upgraded {
        incoming: Incoming {
            io: read,
            buf: leftover,
            codec: Codec::new().max_size(max_message),
            fragments: None,
            max_message,
            pongs: None,
            writer_stopped: stopped_rx,
            done: false,
        },
        writer: FrameWriter {
            io: write,
            buf: BytesMut::new(),
            codec: Codec::new(),
            _stopped: stopped_tx,
        },
    }
}

/// The count of a node's open WebSockets. actix-server stops counting a connection once its
/// upgrade is handed over, so the node bounds its sockets itself.
#[derive(Default, Clone)]
pub struct OpenSockets(Arc<AtomicUsize>);

/// One open socket, counted until it is dropped.
pub struct SocketPermit(Arc<AtomicUsize>);

impl OpenSockets {
    /// Counts one more socket, unless `max` are open already.
    pub fn open(&self, max: usize) -> Option<SocketPermit> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        Some(SocketPermit(self.0.clone()))
    }

    /// Sockets open now: counted until each one's writer has finished (its close frame sent).
    pub fn open_now(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A message arriving in fragments.
struct Fragments {
    text: bool,
    payload: BytesMut,
}

/// The client's messages, read straight off the socket.
pub struct Incoming {
    io: OwnedReadHalf,
    buf: BytesMut,
    codec: Codec,
    fragments: Option<Fragments>,
    max_message: usize,
    pongs: Option<Box<dyn Pongs>>,
    /// Resolves (with an error) when the [`FrameWriter`] is dropped.
    writer_stopped: oneshot::Receiver<()>,
    /// Set after an error, a close frame or the end of the stream: nothing more is read.
    done: bool,
}

impl Incoming {
    /// Answers pings through `pongs`.
    pub fn answer_pings(mut self, pongs: impl Pongs + 'static) -> Self {
        self.pongs = Some(Box::new(pongs));
        self
    }

    /// Turns a decoded frame into a message, or into nothing while a fragmented one is still
    /// arriving.
    fn assemble(&mut self, frame: Frame) -> Result<Option<Received>, ProtocolError> {
        let message = match frame {
            Frame::Text(payload) => Received::Text(utf8(payload)?),
            Frame::Binary(payload) => Received::Binary(payload),
            Frame::Ping(payload) => {
                if let Some(pongs) = &self.pongs {
                    pongs.pong(payload.clone());
                }
                Received::Ping(payload)
            }
            Frame::Pong(payload) => Received::Pong(payload),
            Frame::Close(reason) => Received::Close(reason),
            Frame::Continuation(item) => return self.continue_message(item),
        };
        Ok(Some(message))
    }

    fn continue_message(&mut self, item: Item) -> Result<Option<Received>, ProtocolError> {
        let (text, part, last) = match item {
            Item::FirstText(part) => (Some(true), part, false),
            Item::FirstBinary(part) => (Some(false), part, false),
            Item::Continue(part) => (None, part, false),
            Item::Last(part) => (None, part, true),
        };
        let fragments = match (text, self.fragments.as_mut()) {
            (Some(_), Some(_)) => return Err(ProtocolError::ContinuationStarted),
            (None, None) => return Err(ProtocolError::ContinuationNotStarted),
            (Some(text), None) => self.fragments.insert(Fragments {
                text,
                payload: BytesMut::new(),
            }),
            (None, Some(fragments)) => fragments,
        };
        if fragments.payload.len() + part.len() > self.max_message {
            return Err(ProtocolError::Overflow);
        }
        fragments.payload.extend_from_slice(&part);
        if !last {
            return Ok(None);
        }
        let Some(Fragments { text, payload }) = self.fragments.take() else {
            return Err(ProtocolError::ContinuationNotStarted);
        };
        let payload = payload.freeze();
        Ok(Some(if text {
            Received::Text(utf8(payload)?)
        } else {
            Received::Binary(payload)
        }))
    }

    /// Ends the stream with `item`.
    fn finish(
        &mut self,
        item: Option<Result<Received, ProtocolError>>,
    ) -> Poll<Option<<Self as Stream>::Item>> {
        self.done = true;
        self.buf = BytesMut::new();
        self.fragments = None;
        Poll::Ready(item)
    }
}

fn utf8(payload: Bytes) -> Result<ByteString, ProtocolError> {
    ByteString::try_from(payload)
        .map_err(|err| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, err)))
}

impl Stream for Incoming {
    type Item = Result<Received, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => match this.assemble(frame) {
                    Ok(Some(message @ Received::Close(_))) => {
                        return this.finish(Some(Ok(message)));
                    }
                    Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                    Ok(None) => continue,
                    Err(err) => return this.finish(Some(Err(err))),
                },
                Ok(None) => {}
                Err(err) => return this.finish(Some(Err(err))),
            }
            if Pin::new(&mut this.writer_stopped).poll(cx).is_ready() {
                return this.finish(None);
            }
            match this.io.as_ref().poll_read_ready(cx) {
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // Idle: hand the buffer back rather than hold it until the next frame.
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => return this.finish(Some(Err(ProtocolError::Io(err)))),
                Poll::Ready(Ok(())) => {}
            }
            this.buf.reserve(READ_CHUNK);
            match this.io.as_ref().try_read_buf(&mut this.buf) {
                Ok(0) => return this.finish(None),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return this.finish(Some(Err(ProtocolError::Io(err)))),
            }
        }
    }
}

/// The server's half: frames are encoded into a buffer and written in batches by
/// [`FrameWriter::flush`].
pub struct FrameWriter {
    io: OwnedWriteHalf,
    buf: BytesMut,
    codec: Codec,
    /// Dropped with the writer, which ends [`Incoming`].
    _stopped: oneshot::Sender<()>,
}

impl FrameWriter {
    pub fn text(&mut self, frame: ByteString) -> io::Result<()> {
        self.encode(ws::Message::Text(frame))
    }

    pub fn binary(&mut self, frame: Bytes) -> io::Result<()> {
        self.encode(ws::Message::Binary(frame))
    }

    pub fn ping(&mut self) -> io::Result<()> {
        self.encode(ws::Message::Ping(Bytes::new()))
    }

    /// Echoes a ping's payload, cut to what a control frame may carry.
    pub fn pong(&mut self, mut payload: Bytes) -> io::Result<()> {
        payload.truncate(MAX_CONTROL_PAYLOAD);
        self.encode(ws::Message::Pong(payload))
    }

    /// Encodes a close frame; its reason is cut at a character boundary to fit a control frame.
    pub fn close(&mut self, mut reason: CloseReason) -> io::Result<()> {
        if let Some(description) = reason.description.as_mut() {
            let mut end = description.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !description.is_char_boundary(end) {
                end -= 1;
            }
            description.truncate(end);
        }
        self.encode(ws::Message::Close(Some(reason)))
    }

    /// Bytes encoded and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes what the socket takes without waiting, which is all of it unless the client is
    /// behind. Returns whether everything went out; then, with `release`, the buffer is freed
    /// (the caller knows nothing else is about to be sent).
    pub fn write_now(&mut self, release: bool) -> io::Result<bool> {
        let mut written = 0;
        while written < self.buf.len() {
            match self.io.try_write(&self.buf[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // What is left moves to the front, for the write that waits.
                    self.buf.advance(written);
                    return Ok(false);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.done_writing(release);
        Ok(true)
    }

    /// Empties the written buffer, keeping its allocation for the next write unless `release`.
    fn done_writing(&mut self, release: bool) {
        if release {
            self.buf = BytesMut::new();
        } else {
            self.buf.clear();
        }
    }

    /// Writes everything encoded, giving up with `TimedOut` if the client reads nothing for
    /// `stall`; `release` as for [`FrameWriter::write_now`].
    pub async fn flush(&mut self, release: bool, stall: Duration) -> io::Result<()> {
        if self.write_now(release)? {
            return Ok(());
        }
        self.write_rest(release, stall).await
    }

    /// Waits until what [`FrameWriter::write_now`] left is written, or `TimedOut` after
    /// `stall`; then empties the buffer as `write_now` does.
    pub async fn write_rest(&mut self, release: bool, stall: Duration) -> io::Result<()> {
        within(stall, self.io.write_all_buf(&mut self.buf)).await?;
        self.done_writing(release);
        Ok(())
    }

    /// Ends the server's side of the connection after a close frame, within `stall`.
    pub async fn shutdown(&mut self, stall: Duration) -> io::Result<()> {
        self.flush(true, stall).await?;
        within(stall, self.io.shutdown()).await
    }

    fn encode(&mut self, message: ws::Message) -> io::Result<()> {
        self.codec
            .encode(message, &mut self.buf)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err.to_string()))
    }
}

/// `io`, or `TimedOut` once `stall` has passed.
async fn within(stall: Duration, io: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(stall, io)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    const STALL: Duration = Duration::from_secs(5);

    /// A connected pair: the server's upgraded halves and the client's raw stream.
    async fn pair() -> (Upgraded, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (split(server, BytesMut::new(), 1 << 16), client)
    }

    /// A masked client frame, as a browser sends it.
    fn client_frame(message: ws::Message) -> BytesMut {
        let mut frame = BytesMut::new();
        Codec::new()
            .client_mode()
            .encode(message, &mut frame)
            .expect("encode");
        frame
    }

    #[tokio::test]
    async fn an_idle_socket_holds_no_buffer_on_either_side() {
        let (
            Upgraded {
                mut incoming,
                mut writer,
            },
            mut client,
        ) = pair().await;
        let hello = client_frame(ws::Message::Text("hello".into()));
        client.write_all(&hello).await.expect("client write");
        match incoming.next().await {
            Some(Ok(Received::Text(text))) => assert_eq!(&*text, "hello"),
            other => panic!("expected the text frame, got {other:?}"),
        }
        // Nothing more to read: the next poll waits, and gives the read buffer back first.
        let waiting = futures_util::poll!(incoming.next());
        assert!(waiting.is_pending(), "{waiting:?}");
        assert_eq!(
            incoming.buf.capacity(),
            0,
            "the read buffer outlived the frame"
        );

        writer.text("welcome".into()).expect("encode");
        assert!(writer.buffered() > 0);
        writer.flush(false, STALL).await.expect("flush");
        assert!(writer.buf.capacity() > 0, "kept for a write that follows");
        writer.text("more".into()).expect("encode");
        writer.flush(true, STALL).await.expect("flush");
        assert_eq!(
            writer.buf.capacity(),
            0,
            "the write buffer outlived the write"
        );
    }

    #[tokio::test]
    async fn a_write_the_client_does_not_read_stalls_and_then_completes_in_order() {
        use tokio::io::AsyncReadExt as _;
        let (Upgraded { mut writer, .. }, mut client) = pair().await;
        let payload: Vec<u8> = (0..8 << 20).map(|i: u32| i.to_le_bytes()[1]).collect();
        writer.binary(payload.clone().into()).expect("encode");
        let encoded = writer.buffered();
        assert!(
            !writer.write_now(false).expect("write"),
            "8 MiB fit at once"
        );
        let stalled = writer.flush(false, Duration::from_millis(200)).await;
        assert_eq!(
            stalled.map_err(|err| err.kind()),
            Err(io::ErrorKind::TimedOut)
        );

        let reading = tokio::spawn(async move {
            let mut received = vec![0; encoded];
            client.read_exact(&mut received).await.map(|_| received)
        });
        writer.flush(true, STALL).await.expect("flush once read");
        assert_eq!(writer.buf.capacity(), 0);
        let received = reading.await.expect("reader").expect("read");
        // A 10-byte header (no mask, 64-bit length), then the payload, unbroken.
        assert_eq!(&received[10..], &payload[..]);
    }

    #[tokio::test]
    async fn the_reader_ends_when_the_writer_stops() {
        let (
            Upgraded {
                mut incoming,
                writer,
            },
            _client,
        ) = pair().await;
        drop(writer);
        assert!(incoming.next().await.is_none());
    }
}
