//! OT.md property 2, end to end: three simulated clients run the client state machine
//! (Synchronized / AwaitingConfirm / AwaitingWithBuffer) against one simulated server that
//! rebases incoming operations on its history, with random edits and random delivery delays.
//! Afterwards every client's text equals the server's, and every inserted string is there once.

use std::collections::VecDeque;

use conclave::session::ot::{Component, Operation, compose, transform};
use proptest::prelude::*;

fn units(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

fn text(u: &[u16]) -> String {
    String::from_utf16(u).expect("valid UTF-16")
}

/// What the server sends one client, in order.
#[derive(Debug, Clone)]
enum Downstream {
    Ack(u64),
    Doc(u64, Operation),
}

/// The server half of OT.md: history, rebase, apply.
struct Server {
    text: Vec<u16>,
    history: Vec<Operation>,
    outboxes: Vec<VecDeque<Downstream>>,
}

impl Server {
    fn receive(&mut self, from: usize, base: u64, op: Operation) {
        let mut op = op;
        for earlier in &self.history[base as usize..] {
            op = transform(earlier, &op).1;
        }
        self.text = op.apply(&self.text).expect("rebased op applies");
        self.history.push(op.clone());
        let version = self.history.len() as u64;
        for (i, outbox) in self.outboxes.iter_mut().enumerate() {
            outbox.push_back(if i == from {
                Downstream::Ack(version)
            } else {
                Downstream::Doc(version, op.clone())
            });
        }
    }
}

/// The client half of OT.md.
struct Client {
    text: Vec<u16>,
    known: u64,
    in_flight: Option<Operation>,
    buffer: Option<Operation>,
    /// Sent but not yet delivered to the server: (base, op).
    upstream: VecDeque<(u64, Operation)>,
}

impl Client {
    fn local_edit(&mut self, op: Operation) {
        self.text = op.apply(&self.text).expect("local op applies");
        match (&self.in_flight, &self.buffer) {
            (None, _) => {
                self.upstream.push_back((self.known, op.clone()));
                self.in_flight = Some(op);
            }
            (Some(_), None) => self.buffer = Some(op),
            (Some(_), Some(b)) => self.buffer = Some(compose(b, &op)),
        }
    }

    fn receive(&mut self, message: Downstream) {
        match message {
            Downstream::Ack(version) => {
                self.known = version;
                self.in_flight = self.buffer.take();
                if let Some(b) = &self.in_flight {
                    self.upstream.push_back((version, b.clone()));
                }
            }
            Downstream::Doc(version, s) => {
                self.known = version;
                let mut s = s;
                if let Some(o) = &self.in_flight {
                    let (s1, o1) = transform(&s, o);
                    self.in_flight = Some(o1);
                    s = s1;
                    if let Some(b) = &self.buffer {
                        let (s2, b1) = transform(&s, b);
                        self.buffer = Some(b1);
                        s = s2;
                    }
                }
                self.text = s.apply(&self.text).expect("remote op applies");
            }
        }
    }
}

/// A random edit of the client's current text: insert a unique marker, or delete a range of
/// whole code points.
fn edit_for(text: &[u16], pick: u64, marker: &str) -> Operation {
    let s = String::from_utf16(text).expect("valid");
    let chars: Vec<char> = s.chars().collect();
    let at_char = (pick % (chars.len() as u64 + 1)) as usize;
    let at: u64 = chars[..at_char].iter().map(|c| c.len_utf16() as u64).sum();
    if pick.is_multiple_of(3) && at_char < chars.len() {
        let len = ((pick / 7) % 3 + 1) as usize;
        let end = (at_char + len).min(chars.len());
        let del: u64 = chars[at_char..end]
            .iter()
            .map(|c| c.len_utf16() as u64)
            .sum();
        Operation::normalize(vec![Component::Retain(at), Component::Delete(del)])
    } else {
        Operation::normalize(vec![
            Component::Retain(at),
            Component::Insert(marker.to_owned()),
        ])
    }
    .unwrap_or_else(|_| {
        Operation::normalize(vec![Component::Insert(marker.to_owned())]).expect("insert is valid")
    })
}

/// One scheduling step: 0..3 = a client edits, 3..6 = deliver one upstream message of client
/// k, 6..9 = deliver one downstream message to client k.
fn run(steps: &[(u8, u64)]) {
    let n = 3;
    let initial = units("start😀");
    let mut server = Server {
        text: initial.clone(),
        history: Vec::new(),
        outboxes: vec![VecDeque::new(); n],
    };
    let mut clients: Vec<Client> = (0..n)
        .map(|_| Client {
            text: initial.clone(),
            known: 0,
            in_flight: None,
            buffer: None,
            upstream: VecDeque::new(),
        })
        .collect();
    let mut markers = Vec::new();
    let mut deleted_any = false;
    for (i, &(action, pick)) in steps.iter().enumerate() {
        let k = (action % 3) as usize;
        match action / 3 {
            0 => {
                // Each marker is one unique code point, so no later insert can split it; every
                // other one is an emoji, so surrogate pairs are everywhere.
                let code = if i % 2 == 0 { 0x4E00 } else { 0x1F300 } + i as u32;
                let marker = char::from_u32(code).map(String::from).unwrap_or_default();
                let op = edit_for(&clients[k].text, pick, &marker);
                if op
                    .components()
                    .iter()
                    .any(|c| matches!(c, Component::Delete(_)))
                {
                    deleted_any = true;
                } else {
                    markers.push(marker);
                }
                clients[k].local_edit(op);
            }
            1 => {
                if let Some((base, op)) = clients[k].upstream.pop_front() {
                    server.receive(k, base, op);
                }
            }
            _ => {
                if let Some(message) = server.outboxes[k].pop_front() {
                    clients[k].receive(message);
                }
            }
        }
    }
    // Quiesce: deliver everything, in rounds, until nothing moves.
    loop {
        let mut moved = false;
        for (k, client) in clients.iter_mut().enumerate() {
            while let Some((base, op)) = client.upstream.pop_front() {
                server.receive(k, base, op);
                moved = true;
            }
        }
        for (k, client) in clients.iter_mut().enumerate() {
            while let Some(message) = server.outboxes[k].pop_front() {
                client.receive(message);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let server_text = text(&server.text);
    for (k, client) in clients.iter().enumerate() {
        assert_eq!(text(&client.text), server_text, "client {k} diverged");
        assert!(client.in_flight.is_none() && client.buffer.is_none());
    }
    if !deleted_any {
        for marker in &markers {
            assert_eq!(
                server_text.matches(marker.as_str()).count(),
                1,
                "marker {marker} not there exactly once in {server_text}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn three_clients_converge(steps in proptest::collection::vec((0u8..9, any::<u64>()), 1..120)) {
        run(&steps);
    }

    /// Inserts only: every inserted string must survive exactly once, whatever the interleaving.
    #[test]
    fn three_clients_keep_every_insert(
        steps in proptest::collection::vec((0u8..9, (0u64..1000).prop_map(|p| p * 3 + 1)), 1..120)
    ) {
        run(&steps);
    }
}
