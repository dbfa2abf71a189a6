//! The cost of the protocol edge: parsing client frames and encoding server frames.
//!
//! Every frame a client sends goes through `parse_request` once; every committed event is encoded
//! once as a `ServerFrame::Event` and the text shared by all members (`src/session/actor.rs`).
//!
//! ```text
//! cargo bench --bench protocol
//! ```

use std::hint::black_box;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use conclave::protocol::frames::ServerFrame;
use conclave::protocol::{Role, SessionId, UserInfo, parse_request};
use conclave::session::log::{Actor, Event, EventKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;

const CHAT: &str =
    r#"{"type":"chat","ref":"3","session":"design-review","text":"hello, shall we start?"}"#;
const JOIN: &str = r#"{"type":"join","ref":"1","session":"design-review","since":41,"epoch":"0197a5d2-1c4e-7b1a-9f3e-4a2b8c6d0e1f"}"#;
const PRESENCE: &str = r#"{"type":"presence","session":"design-review","state":{"cursor":{"doc":"main","anchor":3,"head":7},"status":"typing"}}"#;
/// Well-formed JSON that is not a valid frame: the slow path that re-reads the `ref`.
const BAD_CHAT: &str = r#"{"type":"chat","ref":"9","session":"design-review","text":5}"#;

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_request");
    for (name, frame) in [
        ("chat", CHAT),
        ("join", JOIN),
        ("presence", PRESENCE),
        ("invalid_chat", BAD_CHAT),
    ] {
        // Every frame parses as intended before it is timed.
        assert_eq!(
            parse_request(frame).is_ok(),
            name != "invalid_chat",
            "{name}"
        );
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| b.iter(|| parse_request(black_box(frame))));
    }
    group.finish();
}

fn event(offset: u64, kind: EventKind, data: String) -> Event {
    Event {
        offset,
        kind,
        actor: Actor {
            id: "0197a5d2-1c4e-7b1a-9f3e-4a2b8c6d0e1f".into(),
            name: "Ada".into(),
        },
        at: Utc
            .timestamp_millis_opt(1_760_000_000_123)
            .single()
            .expect("a valid timestamp"),
        data: RawValue::from_string(data).expect("valid JSON data"),
    }
}

fn encode(c: &mut Criterion) {
    let session = SessionId::parse("design-review").expect("a valid session name");
    let user = UserInfo {
        id: "0197a5d2-1c4e-7b1a-9f3e-4a2b8c6d0e1f".into(),
        name: "Ada".into(),
        role: Role::Editor,
    };
    let long_text = "lorem ipsum dolor sit amet ".repeat(38); // ~1 KiB
    let cases = [
        (
            "event_chat",
            event(
                58,
                EventKind::Chat,
                serde_json::json!({"text": "hello, shall we start?"}).to_string(),
            ),
        ),
        (
            "event_chat_1k",
            event(
                59,
                EventKind::Chat,
                serde_json::json!({ "text": long_text }).to_string(),
            ),
        ),
        (
            "event_member_joined",
            event(
                60,
                EventKind::MemberJoined,
                serde_json::json!({ "user": user }).to_string(),
            ),
        ),
    ];

    let mut group = c.benchmark_group("server_frame_encode");
    for (name, event) in &cases {
        let frame = ServerFrame::Event {
            session: &session,
            event,
        };
        group.throughput(Throughput::Bytes(frame.encode().len() as u64));
        group.bench_function(*name, |b| b.iter(|| black_box(&frame).encode()));
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = parse, encode
}
criterion_main!(benches);
