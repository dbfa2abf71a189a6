//! A null server for `conclave load native`: the same frames as Conclave, and no work behind
//! them, to tell the machine's share of a latency from the server's.
//!
//! It speaks just enough of `/v1/ws` for the scenario (`hello` → `welcome`, `join` → `joined`,
//! `chat` → `ack` to the sender and `event` to every member, in one order per session), encoding
//! Conclave's own `ServerFrame`s once per broadcast. It keeps nothing: no store, no log, no
//! actors, no limits. One tokio task per socket reads its frames and writes whatever its queue
//! holds in one flush; a session is a counter and a list of queues under a mutex. What it costs
//! is the loopback sockets, WebSocket framing and the async runtime, which any server pays for
//! the same traffic, and the load generator beside it on the same cores.
//!
//! ```text
//! cargo run --release --example null_server -- 127.0.0.1:18081 [THREADS]
//! conclave load native --url ws://127.0.0.1:18081 --sessions 1000 --clients 10 --rate 1 …
//! ```
//!
//! `THREADS`: 0 (the default) for tokio's multi-threaded runtime on every core, 1 for one
//! thread, n for n workers. Not a server to run for anything else: it trusts every name and
//! never bounds a queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::value::to_raw_value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use conclave::protocol::{Role, ServerFrame, SessionId, UserInfo};
use conclave::session::log::{Actor, ChatData, Event, EventKind};

/// The client frames the scenario sends; anything else is ignored.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Hello {
        name: Option<String>,
    },
    Join {
        #[serde(rename = "ref")]
        reference: Option<String>,
        session: String,
    },
    Chat {
        #[serde(rename = "ref")]
        reference: Option<String>,
        session: String,
        text: String,
    },
    #[serde(other)]
    Other,
}

/// A session: the last offset given out and the queues of its members.
#[derive(Default)]
struct Room {
    offset: u64,
    members: Vec<(u64, UnboundedSender<Utf8Bytes>)>,
}

type Rooms = Arc<Mutex<HashMap<SessionId, Arc<Mutex<Room>>>>>;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:18081".into());
    let threads: usize = match args.next() {
        Some(n) => n.parse().map_err(std::io::Error::other)?,
        None => 0,
    };
    let runtime = match threads {
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(accept(bind))
}

/// Serves every socket that connects to `bind`, until the process is killed.
async fn accept(bind: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(&bind).await?;
    eprintln!("null server on ws://{bind}");
    let rooms = Rooms::default();
    let mut next_conn = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        next_conn += 1;
        tokio::spawn(serve(stream, next_conn, rooms.clone()));
    }
}

fn text(frame: &ServerFrame<'_>) -> Utf8Bytes {
    Utf8Bytes::from(frame.encode().to_string())
}

/// One socket: its frames in, its queue out, until either side ends.
async fn serve(stream: TcpStream, conn: u64, rooms: Rooms) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (tx, mut rx): (_, UnboundedReceiver<Utf8Bytes>) = unbounded_channel();
    let mut user = UserInfo {
        id: format!("c{conn}"),
        name: String::new(),
        role: Role::Editor,
    };
    let mut joined: Vec<Arc<Mutex<Room>>> = Vec::new();
    loop {
        tokio::select! {
            Some(first) = rx.recv() => {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut failed = false;
                for frame in batch {
                    failed |= ws.feed(Message::Text(frame)).await.is_err();
                }
                if failed || ws.flush().await.is_err() {
                    break;
                }
            }
            incoming = ws.next() => {
                let Some(Ok(Message::Text(body))) = incoming else {
                    match incoming {
                        Some(Ok(_)) => continue,
                        _ => break,
                    }
                };
                match serde_json::from_str::<Request>(&body) {
                    Ok(Request::Hello { name }) => {
                        user.name = name.unwrap_or_default();
                        let conn_id = conn.to_string();
                        let _ = tx.send(text(&ServerFrame::Welcome {
                            conn: &conn_id,
                            user: &user,
                            node: "null",
                            protocol: 1,
                        }));
                    }
                    Ok(Request::Join { reference, session }) => {
                        let Ok(id) = SessionId::parse(&session) else { continue };
                        let room = rooms.lock().map(|mut r| r.entry(id.clone()).or_default().clone());
                        let Ok(room) = room else { break };
                        let Ok(mut state) = room.lock() else { break };
                        state.members.push((conn, tx.clone()));
                        let _ = tx.send(text(&ServerFrame::Joined {
                            reference: reference.as_deref(),
                            session: &id,
                            offset: state.offset,
                            epoch: "null",
                            members: &[],
                            presence: &[],
                            docs: &[],
                        }));
                        drop(state);
                        joined.push(room);
                    }
                    Ok(Request::Chat { reference, session, text: chat }) => {
                        let Ok(id) = SessionId::parse(&session) else { continue };
                        let room = rooms.lock().map(|r| r.get(&id).cloned());
                        let Ok(Some(room)) = room else { continue };
                        let Ok(mut state) = room.lock() else { break };
                        state.offset += 1;
                        let event = Event {
                            offset: state.offset,
                            kind: EventKind::Chat,
                            actor: Actor { id: user.id.clone(), name: user.name.clone() },
                            at: Utc::now(),
                            data: to_raw_value(&ChatData { text: &chat })
                                .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
                        };
                        let _ = tx.send(text(&ServerFrame::Ack {
                            reference: reference.as_deref(),
                            offset: Some(state.offset),
                            doc: None,
                            version: None,
                            task: None,
                            council: None,
                        }));
                        let frame = text(&ServerFrame::Event { session: &id, event: &event });
                        for (_, member) in &state.members {
                            let _ = member.send(frame.clone());
                        }
                    }
                    Ok(Request::Other) | Err(_) => {}
                }
            }
        }
    }
    for room in joined {
        if let Ok(mut state) = room.lock() {
            state.members.retain(|(member, _)| *member != conn);
        }
    }
}
