//! A minimal y-websocket client for tests: connect with `?token=`, sync, send an update, and
//! read the server's binary frames.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Message as YMessage, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, OffsetKind, Options, StateVector, Text, Transact};

pub type YjsSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn yjs_connect(addr: SocketAddr, path: &str, token: &str) -> Result<YjsSocket, u16> {
    let url = format!("ws://{addr}/v1/yjs/{path}?token={token}");
    match tokio_tungstenite::connect_async(url).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("yjs connect failed: {err}"),
    }
}

/// Reads binary frames until one decodes to a message `want` accepts.
pub async fn yjs_until(
    socket: &mut YjsSocket,
    mut want: impl FnMut(&YMessage) -> bool,
) -> YMessage {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("no matching Yjs message within 5 s")
            .expect("socket ended")
            .expect("socket error");
        if let Message::Binary(bytes) = next {
            for message in conclave::protocol::yjs::decode(&bytes) {
                let message = message.expect("server frames decode");
                if want(&message) {
                    return message;
                }
            }
        }
    }
}

/// Syncs a fresh Yjs doc from the server, then sends an update that inserts `text`.
pub async fn yjs_insert(socket: &mut YjsSocket, text: &str) {
    let doc = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let step1 = YMessage::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1();
    socket
        .send(Message::Binary(step1.into()))
        .await
        .expect("send step 1");
    if let YMessage::Sync(SyncMessage::SyncStep2(update)) = yjs_until(socket, |m| {
        matches!(m, YMessage::Sync(SyncMessage::SyncStep2(_)))
    })
    .await
    {
        doc.transact_mut()
            .apply_update(yrs::Update::decode_v1(&update).expect("decodes"))
            .expect("applies");
    }
    let content = doc.get_or_insert_text("content");
    let update = {
        let mut txn = doc.transact_mut();
        let len = content.len(&txn);
        content.insert(&mut txn, len, text);
        txn.encode_update_v1()
    };
    assert!(content.get_string(&doc.transact()).ends_with(text));
    let frame = YMessage::Sync(SyncMessage::Update(update)).encode_v1();
    socket
        .send(Message::Binary(frame.into()))
        .await
        .expect("send update");
}
