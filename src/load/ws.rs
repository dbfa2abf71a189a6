//! WebSocket plumbing shared by the scenarios: connecting with a deadline, reading the JSON
//! frames of `/v1/ws` and `/v1/workers` without copying, and the hello/join handshake.
//!
//! Nothing read from the network is trusted: every frame is parsed fallibly, and every failure
//! becomes a [`Failure`] with a short code that the report counts.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a client could not go on: `code` is what the report counts (`connect`, `http_404`,
/// `timeout`, `closed`, or the server's error code), `detail` a sample of what happened.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: String,
    pub detail: String,
}

impl Failure {
    pub fn new(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            detail: detail.into(),
        }
    }
}

/// Each socket's read and write buffers. tungstenite's default is 128 KiB each, allocated
/// up front: 2.5 GiB for a run of 10,000 sockets, where the frames here are well under a
/// kilobyte. Larger messages still arrive whole; the buffer only sets the read size.
const SOCKET_BUFFER: usize = 8 << 10;

/// Opens a WebSocket to `url` within `limit`, Nagle off (as browsers have it), so the client
/// adds no delay of its own to the latencies it measures.
pub async fn connect(url: &Url, limit: Duration) -> Result<Socket, Failure> {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER);
    match tokio::time::timeout(
        limit,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
    )
    .await
    {
        Err(_) => Err(Failure::new(
            "timeout",
            format!("connecting to {url} took over {limit:?}"),
        )),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            Err(Failure::new(
                format!("http_{status}"),
                format!("{url} answered the upgrade with HTTP {status}"),
            ))
        }
        Ok(Err(err)) => Err(Failure::new("connect", format!("{url}: {err}"))),
        Ok(Ok((socket, _))) => Ok(socket),
    }
}

/// A server frame on the JSON sockets: only the fields the load generator reads, borrowed from
/// the frame's text where possible (event frames are the hot path).
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub frame: Cow<'a, str>,
    #[serde(rename = "ref", borrow, default)]
    pub reference: Option<Cow<'a, str>>,
    /// An event's kind (`chat`, `task.completed`, …).
    #[serde(borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub message: Option<Cow<'a, str>>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(borrow, default)]
    pub doc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// A task id (in an `ack`) or a task object (in an `assign`).
    #[serde(borrow, default)]
    pub task: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub ops: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub docs: Option<&'a RawValue>,
    #[serde(default)]
    pub heartbeat_s: Option<u64>,
}

impl<'a> Frame<'a> {
    pub fn parse(text: &'a str) -> Result<Self, Failure> {
        serde_json::from_str(text).map_err(|err| {
            let head: String = text.chars().take(120).collect();
            Failure::new("bad_frame", format!("{err}: {head}"))
        })
    }

    /// The request id, when the client's refs are numbers (they always are here).
    pub fn ref_number(&self) -> Option<u64> {
        self.reference.as_deref().and_then(|r| r.parse().ok())
    }

    /// The server's error as a failure.
    pub fn failure(&self) -> Failure {
        Failure::new(
            self.code.as_deref().unwrap_or("error"),
            self.message.as_deref().unwrap_or("").to_owned(),
        )
    }
}

/// The next text frame, or why there is none by `deadline`. Pings are answered by tungstenite
/// as the stream is read; binary frames are skipped.
pub async fn next_text(ws: &mut Socket, deadline: Instant) -> Result<Utf8Bytes, Failure> {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Failure::new("timeout", "no frame from the server in time")),
            Ok(None) => return Err(Failure::new("closed", "the server ended the stream")),
            Ok(Some(Err(err))) => return Err(Failure::new("closed", err.to_string())),
            Ok(Some(Ok(Message::Close(close)))) => {
                return Err(Failure::new(
                    "closed",
                    format!("the server closed the socket: {close:?}"),
                ));
            }
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends one text frame.
pub async fn send(ws: &mut Socket, frame: String) -> Result<(), Failure> {
    ws.send(Message::text(frame))
        .await
        .map_err(|err| Failure::new("send", err.to_string()))
}

/// Reads until the frame of type `want` (with `reference`, if given); an `error` frame for the
/// same request, or one without a ref, fails. Other frames are skipped, at most `MAX_SKIPPED`.
pub async fn expect(
    ws: &mut Socket,
    want: &str,
    reference: Option<&str>,
    limit: Duration,
) -> Result<String, Failure> {
    const MAX_SKIPPED: usize = 100_000;
    let deadline = Instant::now() + limit;
    for _ in 0..MAX_SKIPPED {
        let text = next_text(ws, deadline).await?;
        let frame = Frame::parse(&text)?;
        let same_ref = frame.reference.as_deref() == reference;
        if frame.frame == want && (reference.is_none() || same_ref) {
            return Ok(text.as_str().to_owned());
        }
        if frame.frame == "error" && (same_ref || frame.reference.is_none()) {
            let failure = frame.failure();
            return Err(Failure::new(
                failure.code,
                format!("refused while waiting for {want}: {}", failure.detail),
            ));
        }
    }
    Err(Failure::new(
        "timeout",
        format!("no {want} among {MAX_SKIPPED} frames"),
    ))
}

/// `hello` → `welcome` on a user or worker socket; returns the welcome frame's text.
pub async fn hello(
    ws: &mut Socket,
    mut hello: serde_json::Map<String, serde_json::Value>,
    token: Option<&str>,
    limit: Duration,
) -> Result<String, Failure> {
    hello.insert("type".into(), "hello".into());
    if let Some(token) = token {
        hello.insert("token".into(), token.into());
    }
    send(ws, serde_json::Value::Object(hello).to_string()).await?;
    expect(ws, "welcome", None, limit).await
}

/// Connects to `/v1/ws`, says hello as `name` and joins `session` (replaying from `since` when
/// given); returns the socket and the `joined` frame's text.
pub async fn join_session(
    url: &Url,
    token: Option<&str>,
    name: &str,
    session: &str,
    since: Option<u64>,
    limit: Duration,
) -> Result<(Socket, String), Failure> {
    let mut ws = connect(url, limit).await?;
    let mut fields = serde_json::Map::new();
    fields.insert("name".into(), name.into());
    hello(&mut ws, fields, token, limit).await?;
    let mut join = serde_json::json!({"type": "join", "ref": "join", "session": session});
    if let Some(since) = since {
        join["since"] = since.into();
    }
    send(&mut ws, join.to_string()).await?;
    let joined = expect(&mut ws, "joined", Some("join"), limit).await?;
    Ok((ws, joined))
}

/// Closes politely, bounded: a server that does not answer the close is not waited for.
pub async fn close(ws: &mut Socket) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_borrowed_and_refuse_garbage() {
        let text = r#"{"type":"event","session":"s","offset":58,"kind":"chat","actor":{"id":"u"},"at":"t","data":{"text":"hi"}}"#;
        let f = Frame::parse(text).unwrap();
        assert_eq!(f.frame, "event");
        assert_eq!(f.kind.as_deref(), Some("chat"));
        assert_eq!(f.offset, Some(58));
        assert_eq!(f.data.map(RawValue::get), Some(r#"{"text":"hi"}"#));
        assert!(matches!(f.frame, Cow::Borrowed(_)));

        let ack = Frame::parse(r#"{"type":"ack","ref":"12","task":"t-1"}"#).unwrap();
        assert_eq!(ack.ref_number(), Some(12));
        assert_eq!(ack.task.map(RawValue::get), Some(r#""t-1""#));

        let err = Frame::parse(r#"{"type":"error","ref":"x","code":"rate_limited","message":"m"}"#)
            .unwrap();
        assert_eq!(err.failure().code, "rate_limited");
        assert_eq!(err.ref_number(), None);

        assert_eq!(Frame::parse("{").unwrap_err().code, "bad_frame");
        assert_eq!(
            Frame::parse(r#"{"ref":"1"}"#).unwrap_err().code,
            "bad_frame"
        );
    }
}
