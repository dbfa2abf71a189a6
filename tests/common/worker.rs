//! A scripted worker agent for the tests: it speaks the worker protocol of PROTOCOL.md over a
//! real socket, heartbeats while it waits, and lets a test decide what to do with each `assign`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{FRAME_TIMEOUT, WsClient};

/// One worker connection on `/v1/workers`.
pub struct TestWorker {
    pub ws: WsClient,
    /// The id from `welcome`.
    pub id: String,
    pub heartbeat: Duration,
    next_ref: u64,
    /// Frames read while waiting for a reply, handed out first.
    backlog: std::collections::VecDeque<Value>,
}

impl TestWorker {
    /// Connects to the node at `addr` (`127.0.0.1:port`) and says `hello` with no token.
    pub async fn connect(
        addr: impl std::fmt::Display,
        capabilities: &[&str],
        capacity: i64,
    ) -> Self {
        Self::connect_as(addr, None, capabilities, capacity).await
    }

    pub async fn connect_as(
        addr: impl std::fmt::Display,
        token: Option<&str>,
        capabilities: &[&str],
        capacity: i64,
    ) -> Self {
        let mut ws = WsClient::connect(&format!("ws://{addr}/v1/workers")).await;
        let mut hello = json!({"type": "hello", "name": "test-worker",
            "capabilities": capabilities, "capacity": capacity});
        if let Some(token) = token {
            hello["token"] = json!(token);
        }
        ws.send(hello).await;
        let welcome = ws.recv().await;
        assert_eq!(welcome["type"], "welcome", "hello answered with {welcome}");
        let id = welcome["worker"]
            .as_str()
            .expect("welcome.worker")
            .to_owned();
        let heartbeat = Duration::from_secs(welcome["heartbeat_s"].as_u64().expect("heartbeat_s"));
        Self {
            ws,
            id,
            heartbeat,
            next_ref: 0,
            backlog: Default::default(),
        }
    }

    pub async fn heartbeat(&mut self) {
        self.ws.send(json!({"type": "heartbeat"})).await;
    }

    /// The next frame within `timeout`, heartbeating meanwhile so the server keeps our leases.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(frame) = self.backlog.pop_front() {
            return Some(frame);
        }
        self.read(timeout).await
    }

    /// The next frame off the socket, heartbeating while waiting.
    async fn read(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let wait = left.min(self.heartbeat / 2);
            if let Some(frame) = self.ws.try_recv(wait).await {
                return Some(frame);
            }
            self.heartbeat().await;
        }
    }

    /// Reads frames until one of type `kind`, within `timeout`, heartbeating meanwhile. Panics
    /// on an `error` frame, which no waiting test expects.
    pub async fn expect_within(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_recv(left).await {
                Some(frame) if frame["type"] == kind => return frame,
                Some(frame) if frame["type"] == "error" => {
                    panic!("worker got an error while waiting for {kind}: {frame}")
                }
                Some(_) => {}
                None => panic!("worker got no {kind} within {timeout:?}"),
            }
        }
    }

    /// The next `assign`'s task.
    pub async fn next_task(&mut self) -> Value {
        self.expect_within("assign", FRAME_TIMEOUT).await["task"].clone()
    }

    /// Sends `frame` with a fresh `ref` and returns the answer with that `ref`; other frames
    /// that arrive meanwhile are kept for later.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_ref += 1;
        let reference = format!("w{}", self.next_ref);
        frame["ref"] = json!(reference);
        self.ws.send(frame).await;
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left).await {
                Some(answer) if answer["ref"] == reference.as_str() => return answer,
                Some(other) => self.backlog.push_back(other),
                None => panic!("no answer to {reference}"),
            }
        }
    }

    /// Completes `task` (an `assign`'s task) under its lease; returns the `ack` or `error`.
    pub async fn complete(&mut self, task: &Value, output: Value) -> Value {
        self.request(
            json!({"type": "complete", "task": task["id"], "lease": task["lease"],
            "output": output}),
        )
        .await
    }

    pub async fn fail(&mut self, task: &Value, error: &str, retryable: bool) -> Value {
        self.request(
            json!({"type": "fail", "task": task["id"], "lease": task["lease"],
            "error": error, "retryable": retryable}),
        )
        .await
    }

    pub async fn progress(&mut self, task: &Value, data: Value) -> Value {
        self.request(
            json!({"type": "progress", "task": task["id"], "lease": task["lease"],
            "data": data}),
        )
        .await
    }

    /// Every frame until none arrives for `quiet`, heartbeating meanwhile.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut frames = Vec::new();
        while let Some(frame) = self.try_recv(quiet).await {
            frames.push(frame);
        }
        frames
    }
}

/// Submits a task over REST and returns its id.
pub async fn submit(base: &str, session: &str, body: Value) -> String {
    let (status, task) =
        super::post_json(&format!("{base}/v1/sessions/{session}/tasks"), &body).await;
    assert_eq!(status, 201, "submitting {body}: {task}");
    task["id"].as_str().expect("task.id").to_owned()
}

/// `GET /v1/tasks/{id}`.
pub async fn task(base: &str, id: &str) -> Value {
    let (status, task) = super::get_json(&format!("{base}/v1/tasks/{id}")).await;
    assert_eq!(status, 200, "reading task {id}: {task}");
    task
}

/// Polls a task until `pred` holds, within `timeout`.
pub async fn wait_task(
    base: &str,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let current = task(base, id).await;
        if pred(&current) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never got there; it is {current}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Creates a session with a unique id starting with `prefix`, over REST.
pub async fn new_session(base: &str, prefix: &str) -> String {
    let id = super::unique_session(prefix);
    let (status, body) = super::post_json(
        &format!("{base}/v1/sessions"),
        &json!({"id": id, "title": prefix}),
    )
    .await;
    assert_eq!(status, 201, "creating session {id}: {body}");
    id
}
