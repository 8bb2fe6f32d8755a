//! Shared by the OpenAI endpoint tests: a live `tandem serve` in process (127.0.0.1:0,
//! in-memory store) over a split model on disk, the endpoint in process, a small HTTP/1.1
//! client on hyper, and a Server-Sent Events parser that checks the framing.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use candle_core::DType;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tandem_edge::openai::{self, OpenAiConfig, OpenAiHandle};
use tandem_edge::{ClientConfig, EdgeBundle};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_serve::server::{self, ServerConfig, ServerHandle};
use tokio::net::TcpStream;

use crate::common;

/// A split checkpoint on disk (edge and cloud) and a server over its cloud part.
pub struct Live {
    pub dir: tempfile::TempDir,
    pub bundle: EdgeBundle,
    pub server: ServerHandle,
}

impl Live {
    /// The tiny random model (hidden 64, 4 layers) with the tiny ChatML tokenizer, cut after
    /// layer 1.
    pub async fn tiny() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let hf = dir.path().join("hf");
        common::write_hf(&hf, &common::specs()[0]);
        common::write_tokenizer(&hf);
        let ck = Checkpoint::open(&hf).expect("open");
        Self::start(dir, &ck, 0.02).await
    }

    /// The demo model, cut after layer 1, f32.
    pub async fn demo(gguf: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = Checkpoint::open(gguf).expect("open demo");
        Self::start(dir, &ck, 0.1).await
    }

    async fn start(dir: tempfile::TempDir, ck: &Checkpoint, kv_cache_gib: f64) -> Self {
        let opts = SplitOptions {
            edge_layers: 1,
            dtype: DType::F32,
            force: false,
            progress: false,
        };
        let split = dir.path().join("split");
        write_split(ck, &split, &opts).expect("split");
        let bundle = EdgeBundle::load(&split).expect("load edge");
        let cfg = ServerConfig {
            cloud: split.join("cloud"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
            kv_cache_gib,
            ..ServerConfig::default()
        };
        let server = server::start(cfg).await.expect("server");
        Self {
            dir,
            bundle,
            server,
        }
    }

    pub fn edge_dir(&self) -> PathBuf {
        self.dir.path().join("split").join("edge")
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.server.ws_url().as_str())
    }

    /// The endpoint on 127.0.0.1:0, configured by `tweak`.
    pub async fn endpoint(&self, tweak: impl FnOnce(&mut OpenAiConfig)) -> OpenAiHandle {
        let mut cfg = OpenAiConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        tweak(&mut cfg);
        openai::serve(&self.bundle, self.client_config(), cfg)
            .await
            .expect("endpoint")
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request on a new connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("json"))
        .unwrap_or_default();
    let req = req.body(Full::new(Bytes::from(bytes))).expect("request");
    let res = sender.send_request(req).await.expect("send");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes().to_vec();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// Starts a streamed `POST`, reads its transparency id and the first piece of the body,
/// then closes the connection.
pub async fn stream_then_leave(addr: SocketAddr, path: &str, body: &Value) -> (String, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("request");
    let res = sender.send_request(req).await.expect("send");
    let id = res
        .headers()
        .get("x-tandem-transparency-id")
        .and_then(|v| v.to_str().ok())
        .expect("record id")
        .to_owned();
    let mut body = res.into_body();
    let first = loop {
        match body.frame().await.expect("a frame").expect("body") {
            f if f.is_data() => break f.into_data().expect("data").to_vec(),
            _ => {}
        }
    };
    drop(body);
    drop(sender);
    conn.abort();
    (id, first)
}

/// `POST` of a JSON body.
pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, &[], Some(body)).await
}

/// The events of a Server-Sent Events body, checking the framing on the way: every event is
/// one `data: …` line followed by a blank line, and the last is `data: [DONE]`. Returns the
/// JSON of every event before `[DONE]`.
pub fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("UTF-8 stream");
    assert!(text.ends_with("\n\n"), "the stream ends with a blank line");
    let blocks: Vec<&str> = text[..text.len() - 2].split("\n\n").collect();
    let (last, events) = blocks.split_last().expect("at least one event");
    assert_eq!(*last, "data: [DONE]", "the stream ends with data: [DONE]");
    events
        .iter()
        .map(|block| {
            assert!(!block.contains('\n'), "one line per event: {block:?}");
            let data = block.strip_prefix("data: ").expect("a data: line");
            serde_json::from_str(data).expect("each event is JSON")
        })
        .collect()
}
