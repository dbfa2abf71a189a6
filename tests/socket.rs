//! The WebSocket transport the connection actors run on (`conn::socket`, `http::upgrade`):
//! pings are answered, fragmented messages are reassembled up to the hard cap, the node bounds
//! its open sockets, and requests that are not proper upgrades get plain HTTP errors.

mod common;

use std::time::Duration;

use common::{TestServer, WsClient, get_json};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

type Raw =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

async fn raw(url: &str) -> Raw {
    tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
        .0
}

/// The next message that is not a JSON text frame the test does not care about.
async fn next_message(socket: &mut Raw, keep: impl Fn(&Message) -> bool) -> Message {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("nothing arrived within {WAIT:?}"),
            Ok(None) => panic!("the socket ended"),
            Ok(Some(Err(err))) => panic!("the socket failed: {err}"),
            Ok(Some(Ok(message))) if keep(&message) => return message,
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn json_of(message: &Message) -> Value {
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("a JSON frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Sends one fragment of a text message: the first opens it, the last ends it.
async fn send_fragment(
    socket: &mut Raw,
    piece: &[u8],
    first: bool,
    last: bool,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let opcode = if first { Data::Text } else { Data::Continue };
    let frame = Frame::message(piece.to_vec(), OpCode::Data(opcode), last);
    socket.send(Message::Frame(frame)).await
}

/// Sends `text` as a fragmented text message of `pieces` frames.
async fn send_fragmented(socket: &mut Raw, text: &str, pieces: usize) {
    let bytes = text.as_bytes();
    let chunks: Vec<&[u8]> = bytes.chunks(bytes.len().div_ceil(pieces)).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        send_fragment(socket, chunk, i == 0, i + 1 == chunks.len())
            .await
            .expect("sending a fragment");
    }
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_carrying_its_payload() {
    let server = TestServer::sqlite();
    for url in [
        server.ws_url(),
        format!("ws://{}/v1/yjs/pings/main", server.addr),
    ] {
        let mut socket = raw(&url).await;
        socket
            .send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .expect("sending a ping");
        let pong = next_message(&mut socket, |m| matches!(m, Message::Pong(_))).await;
        assert_eq!(
            pong,
            Message::Pong(b"are you there".to_vec().into()),
            "{url}"
        );
    }
}

#[tokio::test]
async fn a_fragmented_message_is_reassembled() {
    let server = TestServer::sqlite();
    let mut socket = raw(&server.ws_url()).await;
    let hello = json!({"type": "hello", "name": "in pieces"}).to_string();
    send_fragmented(&mut socket, &hello, 4).await;
    let welcome = json_of(&next_message(&mut socket, |m| m.is_text()).await);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"]["name"], "in pieces", "{welcome}");

    // A control frame may arrive between the fragments of a message.
    let ping = json!({"type": "ping"}).to_string();
    let (first, rest) = ping.split_at(5);
    send_fragment(&mut socket, first.as_bytes(), true, false)
        .await
        .expect("first fragment");
    socket
        .send(Message::Ping(b"between".to_vec().into()))
        .await
        .expect("ping between fragments");
    send_fragment(&mut socket, rest.as_bytes(), false, true)
        .await
        .expect("last fragment");
    let pong = json_of(&next_message(&mut socket, |m| m.is_text()).await);
    assert_eq!(pong, json!({"type": "pong"}));
}

#[tokio::test]
async fn a_fragmented_message_past_the_hard_cap_closes_with_1009() {
    const MAX_FRAME: usize = 1024;
    let server = TestServer::sqlite_with(|config| config.limits.max_frame_bytes = MAX_FRAME);
    let mut neighbour = WsClient::connect_hello(&server.ws_url(), "neighbour").await;
    let mut socket = raw(&server.ws_url()).await;
    // Eight fragments of 1 KiB: each frame is small, the message twice the hard cap (4 KiB).
    let piece = "x".repeat(MAX_FRAME);
    for i in 0..8 {
        if send_fragment(&mut socket, piece.as_bytes(), i == 0, i == 7)
            .await
            .is_err()
        {
            break;
        }
    }
    let error = json_of(&next_message(&mut socket, |m| m.is_text()).await);
    assert_eq!(error["code"], "too_large", "{error}");
    let close = next_message(&mut socket, |m| m.is_close()).await;
    match close {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1009, "{frame:?}"),
        other => panic!("expected a close frame with 1009, got {other:?}"),
    }
    neighbour.ping_pong().await;
}

#[tokio::test]
async fn the_node_caps_its_open_sockets_and_frees_a_place_when_one_closes() {
    let server = TestServer::sqlite_with(|config| config.limits.max_sockets = 2);
    let first = WsClient::connect_hello(&server.ws_url(), "one").await;
    let mut second = WsClient::connect_hello(&server.ws_url(), "two").await;
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(&[]))
                .expect("a JSON error body");
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        }
        other => panic!("a third socket was not refused with 429: {other:?}"),
    }
    // Plain HTTP is not a socket and is not capped.
    let (status, _) = get_json(&format!("{}/healthz", server.http_url())).await;
    assert_eq!(status, 200);

    first.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut third = loop {
        match tokio_tungstenite::connect_async(server.ws_url()).await {
            Ok((socket, _)) => break socket,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("the closed socket's place was never freed: {err}"),
        }
    };
    let hello = json!({"type": "hello", "name": "three"}).to_string();
    third.send(Message::text(hello)).await.expect("hello");
    let welcome = json_of(&next_message(&mut third, |m| m.is_text()).await);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    second.ping_pong().await;
}

#[tokio::test]
async fn requests_that_are_not_websocket_upgrades_get_plain_errors() {
    let server = TestServer::sqlite();
    let (status, body) = get_json(&format!("{}/v1/ws", server.http_url())).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let (status, body) = get_json(&format!("{}/v1/yjs/s/main", server.http_url())).await;
    assert_eq!(status, 400, "{body}");

    for (path, expected) in [("/v1/nowhere", 404), ("/v1/yjs/only-a-session", 404)] {
        let url = format!("ws://{}{path}", server.addr);
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), expected, "{path}");
            }
            other => panic!("an upgrade to {path} was not refused: {other:?}"),
        }
    }
    // A percent-encoded session name is decoded as the router would.
    let mut socket = raw(&format!("ws://{}/v1/yjs/enc%6Fded/main", server.addr)).await;
    socket
        .send(Message::Ping(b"ok".to_vec().into()))
        .await
        .expect("ping");
    next_message(&mut socket, |m| matches!(m, Message::Pong(_))).await;

    // The node is still serving sockets after all that.
    let mut client = WsClient::connect_hello(&server.ws_url(), "after").await;
    client.ping_pong().await;
}

/// Opens a WebSocket on `path` by hand and then reads nothing, so that no ping is answered;
/// returns the frames the server sent (opcode and payload) until it closed the connection.
async fn frames_to_a_silent_client(addr: std::net::SocketAddr, path: &str) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes())
        .await
        .expect("upgrade request");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut bytes))
        .await
        .expect("the server did not end a silent connection")
        .expect("read");
    let head = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    assert!(
        bytes.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&bytes[..head])
    );
    // Server frames are unmasked, and these are short: one byte of opcode, one of length.
    let mut frames = Vec::new();
    let mut rest = &bytes[head + 4..];
    while let [first, len, tail @ ..] = rest {
        let len = usize::from(*len);
        assert!(
            len < 126 && tail.len() >= len,
            "an unexpected frame: {rest:?}"
        );
        frames.push((first & 0x0f, tail[..len].to_vec()));
        rest = &tail[len..];
    }
    frames
}

/// The node pings every socket (a third of the socket timeout) and closes one that has been
/// silent for the whole timeout, with 1001; a client that answers its pings stays connected.
#[tokio::test]
async fn quiet_sockets_are_pinged_and_silent_ones_are_closed() {
    let server = TestServer::sqlite_with(|config| config.limits.socket_timeout_s = 3);
    for path in ["/v1/ws", "/v1/yjs/keepalive/main"] {
        let url = format!("ws://{}{path}", server.addr);
        let silent = tokio::spawn(frames_to_a_silent_client(server.addr, path));
        // Read on, so that tungstenite answers each ping: the socket outlives the timeout.
        let mut answering = raw(&url).await;
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(read) = tokio::time::timeout_at(until, answering.next()).await {
            match read {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Close(close))) => {
                    panic!("{url}: an answering socket was closed: {close:?}")
                }
                Some(Ok(_)) => {}
                other => panic!("{url}: the answering socket ended: {other:?}"),
            }
        }
        assert!(pings >= 3, "{url}: {pings} pings in 5 s at one a second");

        let frames = silent.await.expect("the silent client");
        let pinged = frames.iter().filter(|(opcode, _)| *opcode == 0x9).count();
        assert!(pinged >= 2, "{url}: {frames:?}");
        let Some((0x8, close)) = frames.last() else {
            panic!("{url}: the last frame is not a close: {frames:?}");
        };
        assert_eq!(close[..2], 1001u16.to_be_bytes(), "{url}: {close:?}");
        assert!(
            String::from_utf8_lossy(&close[2..]).contains("socket timeout"),
            "{url}: {close:?}"
        );
    }
}
