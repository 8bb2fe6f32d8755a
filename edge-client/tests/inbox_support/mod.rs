//! Shared by the inbox tests: a fake REST server (tokio on 127.0.0.1:0, requests parsed by
//! hand, replies written as raw bytes), the API's JSON bodies, and a tiny split model with a
//! tokenizer on disk.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::DType;
use serde_json::json;
use tandem_edge::inbox::{DeviceToken, InboxConfig};
use tandem_edge::EdgeBundle;
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_openapi::inbox::{Accepted, InboxItem};
use tandem_openapi::prompts::AssignmentStatus;
use tandem_protocol::SamplingParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common;

pub const TOKEN: &str = "tdv_s3cr3t-device-token";
pub const ID_A: &str = "00000000000000aa";
pub const ID_B: &str = "00000000000000bb";
pub const ID_C: &str = "00000000000000cc";
pub const SYSTEM: &str = "You are a helpful assistant for a shop.";

// ---------------------------------------------------------------------------------------------
// A fake REST server
// ---------------------------------------------------------------------------------------------

/// A request as the fake server read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the fake server writes back: the whole response, as raw bytes.
pub type Handler = Arc<dyn Fn(&Seen) -> Vec<u8> + Send + Sync>;

pub struct FakeApi {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeApi {
    pub async fn start(handler: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_one(stream, handler.clone(), log.clone()));
            }
        });
        Self { url, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// `METHOD path` of every request, in order.
    pub fn calls(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect()
    }
}

async fn serve_one(mut stream: TcpStream, handler: Handler, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let mut start = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (start.next(), start.next());
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let seen = Seen {
        method: method.unwrap_or_default().to_owned(),
        path: path.unwrap_or_default().to_owned(),
        headers,
    };
    let reply = handler(&seen);
    log.lock().expect("lock").push(seen);
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

pub fn reply(status: u16, extra: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if !body.is_empty() {
        r.push_str("content-type: application/json\r\n");
    }
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

pub fn api_error(status: u16, code: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = json!({"error": {"code": code, "message": format!("{code} happened")}});
    reply(status, extra, &body.to_string())
}

pub fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.7,
        top_k: Some(20),
        seed: 42,
        ..SamplingParams::default()
    }
}

/// A pending item as the server writes it: built from the API's contract type, so that the
/// fake server speaks the contract. `fields` is left empty: the device does not read it.
pub fn item_json(id: &str, partner: &str, template: &str) -> serde_json::Value {
    serde_json::to_value(InboxItem {
        prompt_id: id.into(),
        partner: partner.into(),
        template: template.into(),
        fields: Vec::new(),
        system_prompt: SYSTEM.into(),
        max_tokens: 3,
        sampling: sampling(),
        expires: "2026-11-23T10:00:00.000Z".into(),
        status: AssignmentStatus::Pending,
    })
    .expect("json")
}

pub fn accepted_json(id: &str, partner: &str, template: &str) -> serde_json::Value {
    serde_json::to_value(Accepted {
        prompt_id: id.into(),
        ticket: ticket_for(id),
        partner: partner.into(),
        template: template.into(),
        fields: Vec::new(),
        system_prompt: SYSTEM.into(),
        max_tokens: 3,
        sampling: sampling(),
        expires: "2026-11-23T10:00:00.000Z".into(),
    })
    .expect("json")
}

pub fn ticket_for(id: &str) -> String {
    format!("tkt_{}", id.repeat(4))
}

pub fn config(url: &str) -> InboxConfig {
    let mut cfg = InboxConfig::new(url, DeviceToken::new(TOKEN).expect("token")).expect("cfg");
    cfg.timeout = Duration::from_secs(10);
    cfg
}

/// A tiny split model with a tokenizer on disk (hidden size 64, 4 layers, cut after 1).
pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub bundle: EdgeBundle,
}

pub fn tiny() -> Tiny {
    let dir = tempfile::tempdir().expect("tmp");
    let hf = dir.path().join("hf");
    common::write_hf(&hf, &common::specs()[0]);
    common::write_tokenizer(&hf);
    let ck = Checkpoint::open(&hf).expect("open");
    let opts = SplitOptions {
        edge_layers: 1,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, &dir.path().join("split"), &opts).expect("split");
    let bundle = EdgeBundle::load(&dir.path().join("split")).expect("load edge");
    Tiny { dir, bundle }
}
