//! WebSocket upgrades, served beside actix-web's request pipeline rather than in it.
//!
//! actix-http hands every `Upgrade: websocket` request here together with its TCP stream. This
//! module routes it by path, authenticates where the route asks for it before answering (so a
//! refused Yjs client gets a plain HTTP 401/403/400), completes the handshake, and starts the
//! connection actor on the stream itself (`conn::socket`), which frees actix-http's
//! per-connection buffers. actix-server's connection task ends there too; the connection lives
//! on as its actor and a writer task, counted against `--max-sockets` (see
//! [`OpenSockets`](crate::node::OpenSockets)).

use std::sync::Arc;

use actix::{Actor, AsyncContext as _, StreamHandler};
use actix_codec::{Framed, FramedParts};
use actix_http::body::{BodySize, BoxBody, MessageBody as _};
use actix_http::h1;
use actix_http::{ConnectionType, Request, Response, ws};
use actix_web::ResponseError as _;
use actix_web::web;
use futures_util::{FutureExt as _, SinkExt as _};
use tokio::net::TcpStream;

use super::rest::ApiError;
use crate::auth::Principal;
use crate::conn::socket::{self, Incoming, ProtocolError, Received, Upgraded};
use crate::conn::{ClientConn, Outbound, WorkerConn, YjsConn};
use crate::node::Node;
use crate::protocol::{DocName, ErrorCode, Refusal, SessionId};

/// An upgrade request's connection, still speaking HTTP/1.
pub type HttpConnection = Framed<TcpStream, h1::Codec>;

/// The WebSocket endpoints.
enum Endpoint {
    /// `/v1/ws`: the native protocol; authentication comes in its `hello` frame.
    User,
    /// `/v1/workers`: worker agents; authentication comes in their `hello` frame.
    Worker,
    /// `/v1/yjs/{session}/{doc}`: y-websocket, authenticated by `?token=` before the upgrade.
    Yjs {
        session: SessionId,
        doc: DocName,
        principal: Principal,
    },
}

#[derive(serde::Deserialize)]
struct YjsQuery {
    token: Option<String>,
}

/// Serves one upgrade request: answers it, and on success leaves the socket to its actor and
/// writer. Never fails: what goes wrong is answered to the client or logged.
pub async fn serve(
    node: Arc<Node>,
    req: Request,
    mut connection: HttpConnection,
) -> Result<(), actix_http::Error> {
    let endpoint = match endpoint(&node, &req) {
        Ok(endpoint) => endpoint,
        Err(refusal) => return refuse(&mut connection, refusal).await,
    };
    let Some(permit) = node.sockets.open(node.limits.max_sockets) else {
        let refusal = Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "this node holds its limit of {} sockets; try another node or later",
                node.limits.max_sockets
            ),
        );
        return refuse(&mut connection, refusal).await;
    };
    let handshake = ws::handshake(req.head())
        .map_err(Response::from)
        .and_then(|mut handshake| handshake.message_body(()).map_err(Response::from));
    let handshake = match handshake {
        Ok(handshake) => handshake,
        Err(response) => {
            respond(&mut connection, response).await;
            return Ok(());
        }
    };
    if let Err(err) = connection
        .send(h1::Message::Item((handshake, BodySize::None)))
        .await
    {
        tracing::debug!(%err, "the client left during the websocket handshake");
        return Ok(());
    }
    // Nothing of the HTTP exchange may outlive the handshake: the writer below runs for the
    // connection's whole life.
    drop(req);
    let writing = open(&node, endpoint, connection);
    // `map`, not an async block, which would hold the writer twice over (~1 KiB a socket).
    actix::spawn(writing.map(move |()| drop(permit)));
    Ok(())
}

/// Takes the stream out of its HTTP connection, dropping actix-http's buffers, and starts the
/// endpoint's connection actor. Returns the connection's writer.
fn open(
    node: &Arc<Node>,
    endpoint: Endpoint,
    connection: HttpConnection,
) -> impl Future<Output = ()> + use<> {
    let FramedParts { io, read_buf, .. } = connection.into_parts();
    let limits = &node.limits;
    // The codec's hard cap sits above the protocol limit, so a frame a little too large is
    // answered with `too_large` and the socket lives on; far larger ones end it.
    let max_message = limits.max_frame_bytes.saturating_mul(4);
    let Upgraded { incoming, writer } = socket::split(io, read_buf, max_message);
    let (outbound, writing) = Outbound::open(writer, limits.outbound_queue_bytes);
    let incoming = incoming.answer_pings(outbound.clone());
    match endpoint {
        Endpoint::User => start(incoming, ClientConn::new(node.clone(), outbound)),
        Endpoint::Worker => start(incoming, WorkerConn::new(node.clone(), outbound)),
        Endpoint::Yjs {
            session,
            doc,
            principal,
        } => start(
            incoming,
            YjsConn::new(node.clone(), outbound, principal, session, doc),
        ),
    }
    writing
}

/// Starts a connection actor on this worker's arbiter, reading `incoming`.
fn start<A>(incoming: Incoming, conn: A)
where
    A: Actor<Context = actix::Context<A>> + StreamHandler<Result<Received, ProtocolError>>,
{
    A::create(move |ctx| {
        ctx.add_stream(incoming);
        conn
    });
}

/// Which endpoint a request asks for, or why it is refused.
fn endpoint(node: &Node, req: &Request) -> Result<Endpoint, Refusal> {
    let path = req.path();
    match path {
        "/v1/ws" => return Ok(Endpoint::User),
        "/v1/workers" => return Ok(Endpoint::Worker),
        _ => {}
    }
    let Some((session, doc)) = path
        .strip_prefix("/v1/yjs/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(_, doc)| !doc.contains('/'))
    else {
        return Err(Refusal::not_found(format!(
            "no websocket endpoint at {path}"
        )));
    };
    let session =
        SessionId::parse(&decode(session)?).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let doc = DocName::parse(&decode(doc)?).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let query = web::Query::<YjsQuery>::from_query(req.uri().query().unwrap_or_default())
        .map_err(|e| Refusal::bad_request(e.to_string()))?;
    let principal = node
        .auth
        .authenticate(query.token.as_deref(), None)
        .map_err(|failure| failure.refusal("yjs"))?;
    principal.check_session(&session)?;
    Ok(Endpoint::Yjs {
        session,
        doc,
        principal,
    })
}

/// A path segment, percent-decoded as actix-web's router decodes the ones it matches.
fn decode(segment: &str) -> Result<String, Refusal> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| Refusal::bad_request("a path segment is not UTF-8"))
}

/// Answers the request with the REST API's error for `refusal`.
async fn refuse(
    connection: &mut HttpConnection,
    refusal: Refusal,
) -> Result<(), actix_http::Error> {
    respond(connection, ApiError(refusal).error_response().into()).await;
    Ok(())
}

/// Answers the request with a plain HTTP response and lets the connection close.
async fn respond(connection: &mut HttpConnection, response: Response<BoxBody>) {
    let (mut head, body) = response.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    let body = match body.try_into_bytes() {
        Ok(bytes) => bytes,
        Err(body) => actix_http::body::to_bytes(body).await.unwrap_or_default(),
    };
    let head = head.set_body(());
    let size = BodySize::Sized(body.len() as u64);
    // Head and body leave in one write: a client may read only what the first one brought.
    let sent = async {
        connection.feed(h1::Message::Item((head, size))).await?;
        if !body.is_empty() {
            connection.feed(h1::Message::Chunk(Some(body))).await?;
        }
        connection.send(h1::Message::Chunk(None)).await
    };
    if let Err(err) = sent.await {
        tracing::debug!(%err, "could not answer a refused websocket upgrade");
    }
}
