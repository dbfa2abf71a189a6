//! The shared harness of the integration tests: real nodes (in-process or as the real binary),
//! real stores (SQLite in a temp dir, or a fresh PostgreSQL database), and real sockets.
//!
//! Nothing here mocks anything. Every wait is bounded, and every failure panics with a message
//! that says what was expected.

#![allow(dead_code)]

pub mod worker;
pub mod yjs;

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave::ServeConfig;
use conclave::store::fault::{FaultSwitch, FaultyStore};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The PostgreSQL server the tests use: local, trust auth.
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long one expected frame may take to arrive.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Logs go to the test output when `CONCLAVE_TEST_LOG` is set (an `EnvFilter` directive).
fn init_tracing() {
    if let Ok(filter) = std::env::var("CONCLAVE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Runs `fut` to completion on a fresh runtime in its own thread, so that it can be called from
/// synchronous code and from inside another runtime alike (constructors and `Drop`).
fn block_on_thread<F, T>(fut: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a helper tokio runtime")
            .block_on(fut)
    })
    .join()
    .expect("helper thread panicked")
}

// ---- PostgreSQL -------------------------------------------------------------------------------

/// A fresh, uniquely named database on the local PostgreSQL server, dropped (with `FORCE`) on
/// drop. Creating it panics if PostgreSQL is unreachable: PostgreSQL tests fail, never skip.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create() -> Self {
        let name = format!("conclave_test_{}", uuid::Uuid::now_v7().simple());
        let statement = format!("CREATE DATABASE \"{name}\"");
        let result = block_on_thread(async move {
            use sqlx::Connection as _;
            let mut conn = tokio::time::timeout(
                Duration::from_secs(10),
                sqlx::postgres::PgConnection::connect(PG_ADMIN_URL),
            )
            .await
            .map_err(|_| "timed out connecting".to_owned())?
            .map_err(|e| format!("connecting: {e}"))?;
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .map_err(|e| format!("CREATE DATABASE: {e}"))?;
            let _ = conn.close().await;
            Ok::<_, String>(())
        });
        if let Err(err) = result {
            panic!(
                "PostgreSQL at {PG_ADMIN_URL} is required by this test and could not be used: {err}"
            );
        }
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let result = block_on_thread(async move {
            use sqlx::Connection as _;
            let mut conn = sqlx::postgres::PgConnection::connect(PG_ADMIN_URL)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let _ = conn.close().await;
            Ok::<_, String>(())
        });
        if let Err(err) = result {
            eprintln!("warning: could not drop test database {}: {err}", self.name);
        }
    }
}

// ---- in-process node --------------------------------------------------------------------------

/// Which store a [`TestServer`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A real node started in-process, in its own thread with its own actix `System`, on a real
/// store wrapped in a [`FaultyStore`] so that tests can fail commits on demand.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Fails the store's commits on demand.
    pub switch: Arc<FaultSwitch>,
    /// The id the node reports (`welcome.node`, `owner`).
    pub node_id: String,
    pub backend: Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    // Dropped after the node has stopped (see `Drop`).
    _data_dir: tempfile::TempDir,
    _pg: Option<PgDatabase>,
}

impl TestServer {
    pub fn sqlite() -> Self {
        Self::start(Backend::Sqlite, |_| {})
    }

    pub fn postgres() -> Self {
        Self::start(Backend::Postgres, |_| {})
    }

    pub fn sqlite_with(adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start(Backend::Sqlite, adjust)
    }

    pub fn postgres_with(adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        Self::start(Backend::Postgres, adjust)
    }

    /// Starts a node on `backend`, with the default local configuration changed by `adjust`.
    pub fn start(backend: Backend, adjust: impl FnOnce(&mut ServeConfig)) -> Self {
        init_tracing();
        let data_dir = tempfile::tempdir().expect("creating a temp data dir");
        let pg = (backend == Backend::Postgres).then(PgDatabase::create);
        let mut config = ServeConfig::local(
            "127.0.0.1:0".parse().expect("literal address"),
            data_dir.path().to_path_buf(),
        );
        config.database_url = pg.as_ref().map(|db| db.url.clone());
        adjust(&mut config);
        let location = config.store_location();

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("conclave-test-node".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let store = match conclave::store::connect(&location).await {
                        Ok(store) => store,
                        Err(err) => {
                            let _ = ready_tx.send(Err(format!("store {location:?}: {err}")));
                            return;
                        }
                    };
                    let (faulty, switch) = FaultyStore::wrap(store);
                    match conclave::start_with_store(config, faulty).await {
                        Ok(running) => {
                            let node_id = running.node().id.clone();
                            let _ = ready_tx.send(Ok((running.local_addr(), switch, node_id)));
                            // A dropped sender (the TestServer went away) also stops the node.
                            let _ = stop_rx.await;
                            running.shutdown().await;
                        }
                        Err(err) => {
                            let _ = ready_tx.send(Err(format!("start: {err}")));
                        }
                    }
                });
            })
            .expect("spawning the node thread");

        let (addr, switch, node_id) = match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(ready)) => ready,
            Ok(Err(err)) => panic!("the test node ({backend:?}) failed to start: {err}"),
            Err(err) => {
                panic!("the test node ({backend:?}) did not start within {START_TIMEOUT:?}: {err}")
            }
        };
        Self {
            addr,
            switch,
            node_id,
            backend,
            stop: Some(stop_tx),
            thread: Some(thread),
            _data_dir: data_dir,
            _pg: pg,
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Shuts the node down (drain, then stop) and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown_and_join();
    }

    fn shutdown_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                if thread.join().is_err() && !std::thread::panicking() {
                    panic!("the test node's thread panicked");
                }
            } else {
                eprintln!("warning: the test node did not stop within 20 s; leaving it behind");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown_and_join();
    }
}

// ---- WebSocket client -------------------------------------------------------------------------

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server did with a socket, when a test waits for it to end.
#[derive(Debug)]
pub enum Ending {
    /// A close frame arrived, with its code (if any).
    Closed(Option<u16>),
    /// The TCP stream ended or failed without a close frame.
    Dropped(String),
}

/// A client of `/v1/ws` speaking the native JSON protocol.
pub struct WsClient {
    socket: Socket,
    /// Frames read ahead of a reply (by [`WsClient::join`]), handed out first.
    pending: VecDeque<Value>,
    /// The `welcome` frame, once `hello` was answered.
    pub welcome: Option<Value>,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (socket, _) =
            tokio::time::timeout(FRAME_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
                .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Self {
            socket,
            pending: VecDeque::new(),
            welcome: None,
        }
    }

    /// Connects over a TCP socket with a tiny receive buffer, so that a client that stops
    /// reading backs up into the server quickly (slow-consumer tests).
    pub async fn connect_small_window(addr: SocketAddr, url: &str, recv_buffer: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .set_recv_buffer_size(recv_buffer)
            .expect("setting the receive buffer");
        let stream = tokio::time::timeout(FRAME_TIMEOUT, socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let (socket, _) = tokio::time::timeout(
            FRAME_TIMEOUT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
        )
        .await
        .unwrap_or_else(|_| panic!("the WebSocket handshake with {url} timed out"))
        .unwrap_or_else(|e| panic!("the WebSocket handshake with {url}: {e}"));
        Self {
            socket,
            pending: VecDeque::new(),
            welcome: None,
        }
    }

    /// Connects and says `hello`: the usual start.
    pub async fn connect_hello(url: &str, name: &str) -> Self {
        let mut client = Self::connect(url).await;
        client.hello(name).await;
        client
    }

    /// Sends `hello` and returns the `welcome`.
    pub async fn hello(&mut self, name: &str) -> Value {
        self.send(json!({"type": "hello", "name": name})).await;
        let welcome = self.recv().await;
        assert_eq!(welcome["type"], "welcome", "hello answered with {welcome}");
        assert!(
            welcome["conn"].is_string(),
            "welcome without conn: {welcome}"
        );
        assert!(
            welcome["user"]["id"].is_string(),
            "welcome without user id: {welcome}"
        );
        assert_eq!(welcome["user"]["name"], name, "welcome: {welcome}");
        assert_eq!(welcome["protocol"], 1, "welcome: {welcome}");
        self.welcome = Some(welcome.clone());
        welcome
    }

    /// This connection's id, from `welcome`.
    pub fn conn_id(&self) -> String {
        self.welcome.as_ref().expect("hello first")["conn"]
            .as_str()
            .expect("conn is a string")
            .to_owned()
    }

    /// This connection's user id, from `welcome`.
    pub fn user_id(&self) -> String {
        self.welcome.as_ref().expect("hello first")["user"]["id"]
            .as_str()
            .expect("user.id is a string")
            .to_owned()
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text)).await;
    }

    /// Sends a text frame; `Err` if the socket is gone or the send stalls.
    pub async fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        match tokio::time::timeout(FRAME_TIMEOUT, self.socket.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    pub async fn send_message(&mut self, message: Message) {
        tokio::time::timeout(FRAME_TIMEOUT, self.socket.send(message))
            .await
            .expect("sending a frame timed out")
            .expect("sending a frame failed");
    }

    /// The next JSON frame, within [`FRAME_TIMEOUT`]. Panics on timeout or if the socket ends.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(FRAME_TIMEOUT).await
    }

    pub async fn recv_within(&mut self, timeout: Duration) -> Value {
        match self.try_recv(timeout).await {
            Some(frame) => frame,
            None => panic!("no frame arrived within {timeout:?}"),
        }
    }

    /// The next JSON frame, or `None` if none arrives within `timeout`. Panics if the socket
    /// ends or a frame is not a JSON object with a `type`.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(frame);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next()).await;
            let message = match next {
                Err(_) => return None,
                Ok(None) => panic!("the socket ended while a frame was expected"),
                Ok(Some(Err(err))) => panic!("the socket failed while a frame was expected: {err}"),
                Ok(Some(Ok(message))) => message,
            };
            if let Some(frame) = decode(message) {
                return Some(frame);
            }
        }
    }

    /// The next JSON frame: `Ok(None)` on timeout, `Err` if the socket ended or failed.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<Option<Value>, String> {
        next_json_frame(&mut self.pending, &mut self.socket, timeout).await
    }

    /// Reads frames until one satisfies `pred`, skipping the others, within `timeout` overall.
    pub async fn recv_until_within(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left).await {
                Some(frame) if pred(&frame) => return frame,
                Some(frame) => {
                    if skipped.len() < 20 {
                        skipped.push(frame);
                    }
                }
                None => panic!(
                    "no matching frame within {timeout:?}; first skipped frames: {skipped:#?}"
                ),
            }
        }
    }

    /// Reads frames until one satisfies `pred`, skipping the others (presence, member events…).
    pub async fn recv_until(&mut self, pred: impl FnMut(&Value) -> bool) -> Value {
        self.recv_until_within(FRAME_TIMEOUT, pred).await
    }

    /// Collects every frame that arrives until none has come for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut frames = Vec::new();
        while let Some(frame) = self.try_recv(quiet).await {
            frames.push(frame);
        }
        frames
    }

    /// Joins `session`, optionally with `since` and `epoch`, and returns `joined`.
    pub async fn join(&mut self, session: &str, since: Option<u64>, epoch: Option<&str>) -> Value {
        let reference = format!("join-{session}");
        let mut frame = json!({"type": "join", "ref": reference, "session": session});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        if let Some(epoch) = epoch {
            frame["epoch"] = json!(epoch);
        }
        self.send(frame).await;
        // Frames of other sessions may arrive first; they are kept for later reads.
        let mut ahead = Vec::new();
        let joined = loop {
            let frame = self.recv().await;
            if frame["ref"] == reference.as_str() {
                break frame;
            }
            ahead.push(frame);
        };
        self.pending.extend(ahead);
        assert_eq!(
            joined["type"], "joined",
            "join of {session} answered with {joined}"
        );
        assert_eq!(joined["ref"], reference.as_str(), "joined: {joined}");
        assert_eq!(joined["session"], session, "joined: {joined}");
        assert!(joined["offset"].is_u64(), "joined without offset: {joined}");
        assert!(
            joined["epoch"].is_string(),
            "joined without epoch: {joined}"
        );
        joined
    }

    /// Sends a chat and waits for its `ack`, skipping other frames; returns the acked offset.
    pub async fn chat(&mut self, session: &str, text: &str) -> u64 {
        let reference = format!("chat-{text}");
        self.send(json!({"type": "chat", "ref": reference, "session": session, "text": text}))
            .await;
        let reply = self.recv_until(|f| f["ref"] == reference.as_str()).await;
        assert_eq!(reply["type"], "ack", "chat {text:?} answered with {reply}");
        reply["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("ack without offset: {reply}"))
    }

    /// Sends `ping` and expects `pong` as the very next frame.
    pub async fn ping_pong(&mut self) {
        self.send(json!({"type": "ping"})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"type": "pong"}), "ping answered with {reply}");
    }

    /// Waits for the server to end the socket, skipping frames, within `timeout`. Returns the
    /// ending and the JSON frames that came before it.
    pub async fn wait_end(&mut self, timeout: Duration) -> (Ending, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => panic!("the socket was not ended within {timeout:?}; frames: {frames:?}"),
                Ok(None) => return (Ending::Dropped("stream ended".into()), frames),
                Ok(Some(Err(err))) => return (Ending::Dropped(err.to_string()), frames),
                Ok(Some(Ok(Message::Close(close)))) => {
                    let code = close.map(|CloseFrame { code, .. }| u16::from(code));
                    return (Ending::Closed(code), frames);
                }
                Ok(Some(Ok(message))) => {
                    if let Some(frame) = decode(message) {
                        frames.push(frame);
                    }
                }
            }
        }
    }

    /// Waits for the server to end the socket and checks how: an `error` with `error_code`
    /// first, then a close frame with `close`.
    pub async fn expect_closed_with(&mut self, within: Duration, error_code: &str, close: u16) {
        let (ending, frames) = self.wait_end(within).await;
        assert!(
            frames
                .iter()
                .any(|f| f["type"] == "error" && f["code"] == error_code),
            "no {error_code} error before the close: {frames:?}"
        );
        assert!(
            matches!(ending, Ending::Closed(Some(code)) if code == close),
            "expected close {close}, got {ending:?}"
        );
    }

    /// Closes the socket politely.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(FRAME_TIMEOUT, self.socket.close(None)).await;
        // Read until the server's close arrives, so the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = self.socket.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
    }

    /// Splits into a sending and a receiving half, for tests that do both at once.
    pub fn split(self) -> (WsSender, WsReceiver) {
        let (sink, stream) = self.socket.split();
        let pending = self.pending;
        (WsSender { sink }, WsReceiver { stream, pending })
    }
}

/// A JSON frame from a message; `None` for control frames. Panics on anything else.
fn decode(message: Message) -> Option<Value> {
    match message {
        Message::Text(text) => {
            let frame: Value = serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("server sent a frame that is not JSON ({e}): {text}"));
            assert!(
                frame["type"].is_string(),
                "server frame without a string type: {frame}"
            );
            Some(frame)
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        Message::Binary(bytes) => panic!("unexpected binary frame of {} bytes", bytes.len()),
        Message::Close(close) => panic!("the server closed the socket: {close:?}"),
    }
}

/// The sending half of a split [`WsClient`].
pub struct WsSender {
    sink: SplitSink<Socket, Message>,
}

impl WsSender {
    /// Sends a frame; `Err` if the socket is gone or the send stalls.
    pub async fn try_send(&mut self, frame: Value) -> Result<(), String> {
        match tokio::time::timeout(
            FRAME_TIMEOUT,
            self.sink.send(Message::text(frame.to_string())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        tokio::time::timeout(
            FRAME_TIMEOUT,
            self.sink.send(Message::text(frame.to_string())),
        )
        .await
        .expect("sending a frame timed out")
        .expect("sending a frame failed");
    }
}

/// The receiving half of a split [`WsClient`].
pub struct WsReceiver {
    stream: SplitStream<Socket>,
    pending: VecDeque<Value>,
}

/// The next JSON frame of `stream`, after any read ahead into `pending`: `Ok(None)` on timeout,
/// `Err` if the socket ended or failed. Shared by [`WsClient`] and [`WsReceiver`].
async fn next_json_frame<S>(
    pending: &mut VecDeque<Value>,
    stream: &mut S,
    timeout: Duration,
) -> Result<Option<Value>, String>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    if let Some(frame) = pending.pop_front() {
        return Ok(Some(frame));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err("stream ended".into()),
            Ok(Some(Err(err))) => return Err(err.to_string()),
            Ok(Some(Ok(Message::Close(close)))) => return Err(format!("closed: {close:?}")),
            Ok(Some(Ok(message))) => {
                if let Some(frame) = decode(message) {
                    return Ok(Some(frame));
                }
            }
        }
    }
}

impl WsReceiver {
    /// The next JSON frame, `None` on timeout; `Err` if the socket ended or failed.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<Option<Value>, String> {
        next_json_frame(&mut self.pending, &mut self.stream, timeout).await
    }

    /// The next JSON frame; panics on timeout or if the socket ends.
    pub async fn recv(&mut self) -> Value {
        match self.next_frame(FRAME_TIMEOUT).await {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("no frame arrived within {FRAME_TIMEOUT:?}"),
            Err(err) => panic!("the socket ended while a frame was expected: {err}"),
        }
    }
}

// ---- REST -------------------------------------------------------------------------------------

/// An HTTP client for the node: loopback only, never through a proxy, every request bounded.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building the HTTP client")
}

/// GETs `url` and returns the status and the body parsed as JSON (`Value::Null` if it is not).
pub async fn get_json(url: &str) -> (u16, Value) {
    let response = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url} body: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POSTs `body` as JSON to `url` and returns the status and the JSON body.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = http()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("POST {url} body: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts that `body` is a REST error `{"error":{"code","message"}}` with `code`.
pub fn assert_error_body(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "error body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error body without a message: {body}"
    );
}

/// Every event of a session through `GET /v1/sessions/{id}/events`, a page of 1000 at a time.
pub async fn all_events(base: &str, session: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0u64;
    loop {
        let url = format!("{base}/v1/sessions/{session}/events?after={after}&limit=1000");
        let (status, body) = get_json(&url).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        let page = body["events"]
            .as_array()
            .unwrap_or_else(|| panic!("events page without events: {body}"))
            .clone();
        let Some(last) = page.last() else { break };
        after = last["offset"].as_u64().expect("event offset");
        events.extend(page);
    }
    events
}

/// Asserts that `events` have the offsets `first, first+1, …` with no gap or repeat.
pub fn assert_gap_free(events: &[Value], first: u64) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event["offset"].as_u64(),
            Some(first + i as u64),
            "event #{i} breaks the gap-free order starting at {first}: {event}\nall offsets: {:?}",
            events
                .iter()
                .map(|e| e["offset"].clone())
                .collect::<Vec<_>>()
        );
    }
}

// ---- the real binary --------------------------------------------------------------------------

/// A free loopback port: bound, read and released. A parallel test may take it first, so
/// [`spawn_binary`] retries on a bind failure.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// The `conclave` binary running as a child process; killed on drop.
pub struct BinaryServer {
    pub addr: SocketAddr,
    child: Child,
    pub log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

/// Environment that would change what the binary does; the tests set what they need.
const SCRUBBED_ENV: &[&str] = &[
    "DATABASE_URL",
    "REDIS_URL",
    "CONCLAVE_BIND",
    "CONCLAVE_DATA_DIR",
    "CONCLAVE_NODE_ID",
    "CONCLAVE_JWT_SECRET",
    "CONCLAVE_ANONYMOUS",
    "CONCLAVE_INSECURE_ALLOW_ANONYMOUS",
];

/// Runs `conclave serve ARGS` on a free loopback port and waits until `/healthz` answers.
/// Output goes to a log file, shown when something goes wrong.
pub async fn spawn_binary<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    envs: &[(&str, &str)],
) -> BinaryServer {
    let mut last_log = String::new();
    for _attempt in 0..3 {
        let log_dir = tempfile::tempdir().expect("creating a log dir");
        let log_path = log_dir.path().join("conclave.log");
        let log = std::fs::File::create(&log_path).expect("creating the log file");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let mut command = Command::new(env!("CARGO_BIN_EXE_conclave"));
        command
            .arg("serve")
            .arg("--bind")
            .arg(addr.to_string())
            .args(args.iter().map(AsRef::as_ref));
        // A restarted node keeps its id, as a deployment's would, so it takes its sessions'
        // leases back at once instead of waiting for them to expire.
        if !args.iter().any(|a| a.as_ref() == "--node-id") {
            command.args(["--node-id", "test-node"]);
        }
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        command
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log);
        let child = command.spawn().expect("spawning the conclave binary");
        let mut server = BinaryServer {
            addr,
            child,
            log_path,
            _log_dir: log_dir,
        };
        match server.wait_healthy(START_TIMEOUT).await {
            Ok(()) => return server,
            Err(why) => {
                last_log = server.log();
                if last_log.contains("cannot listen") || last_log.contains("Address already in use")
                {
                    continue; // the port was taken in between: try another
                }
                panic!(
                    "the conclave binary did not become healthy: {why}\n--- log ---\n{last_log}"
                );
            }
        }
    }
    panic!("the conclave binary could not bind a port in 3 attempts\n--- log ---\n{last_log}");
}

impl BinaryServer {
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let url = format!("{}/healthz", self.http_url());
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("building the HTTP client");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the process exited early with {status}"));
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/healthz did not answer within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("sending SIGKILL");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, the graceful shutdown signal.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("running kill -TERM");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }

    /// Waits for the process to exit, within `timeout`; `None` if it has not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- conclave log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// The arguments of a binary node keeping its SQLite data in `dir`, so a restart finds it;
/// callers add their own after them.
pub fn data_dir_args(dir: &Path) -> Vec<std::ffi::OsString> {
    vec!["--data-dir".into(), dir.as_os_str().to_owned()]
}

/// The JWT secret of test nodes that need tokens (e.g. for an admin).
pub const TEST_SECRET: &str = "conclave-test-secret";

/// A node config change: check tokens signed with [`TEST_SECRET`], and still admit anonymous
/// users (as editors) on loopback.
pub fn with_tokens(config: &mut ServeConfig) {
    config.jwt_secret = Some(TEST_SECRET.to_owned());
    config.anonymous = Some(true);
}

/// A token for `sub` with `role`, signed with [`TEST_SECRET`], valid for an hour.
pub fn token(sub: &str, role: conclave::protocol::Role) -> String {
    issue_token(sub, role, None)
}

/// A token like [`token`], limited to `sessions` (ids or `prefix*` patterns).
pub fn scoped_token(sub: &str, role: conclave::protocol::Role, sessions: &[&str]) -> String {
    issue_token(
        sub,
        role,
        Some(sessions.iter().map(|s| (*s).to_owned()).collect()),
    )
}

fn issue_token(sub: &str, role: conclave::protocol::Role, sessions: Option<Vec<String>>) -> String {
    let auth = conclave::auth::Authenticator::new(Some(TEST_SECRET), None, false)
        .expect("an HS256 authenticator");
    let exp = u64::try_from(chrono::Utc::now().timestamp()).expect("time after 1970") + 3600;
    auth.issue(&conclave::auth::Claims {
        sub: sub.to_owned(),
        name: Some(sub.to_owned()),
        role,
        sessions,
        exp,
    })
    .expect("signing a test token")
}

/// Sends a prepared request and returns the status and the JSON body (`Value::Null` if none).
pub async fn send_with(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A session name unique to one test run.
pub fn unique_session(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// The sum of the series of metric `name` whose line contains `label` (e.g. `kind="council"`,
/// or "" for all), scraped from the node at `base`.
pub async fn metric(base: &str, name: &str, label: &str) -> f64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the /metrics text");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A chat event at `offset`, as a session would hand it to the store.
pub fn stored_chat(offset: u64, text: &str) -> conclave::session::log::Event {
    use conclave::session::log::{Actor, EventKind, NewEvent};
    NewEvent::new(
        EventKind::Chat,
        Actor {
            id: "tester".into(),
            name: "tester".into(),
        },
        &json!({ "text": text }),
    )
    .at_offset(offset)
}

/// The data of a session's first thousand events, in offset order, read straight from the store.
pub async fn stored_texts(
    store: &conclave::store::SharedStore,
    session: &conclave::protocol::SessionId,
) -> Vec<String> {
    store
        .events_after(session, 0, 1000)
        .await
        .expect("events")
        .iter()
        .map(|event| event.data.get().to_owned())
        .collect()
}

/// Opens `session` in `store` and takes its lease as node `a` for 30 s, as its owner would.
pub async fn owned_session(
    store: &conclave::store::SharedStore,
    session: &conclave::protocol::SessionId,
) -> conclave::store::Fence {
    store.open_session(session).await.expect("session");
    match store
        .acquire_session(session, "a", Duration::from_secs(30))
        .await
        .expect("acquire")
    {
        conclave::store::Ownership::Acquired(fence) => fence,
        other => panic!("not acquired: {other:?}"),
    }
}
