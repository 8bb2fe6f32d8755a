//! A minimal HTTP/1.1 client for the REST tests (one request per connection), and a dump of
//! every Redis key for the tests that check what the store holds.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one exchange may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// One HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the status and the error shape with `code`; answers the message.
    pub fn expect_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {v}");
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 1, "only `error`: {v}");
        assert_eq!(
            v["error"].as_object().expect("error object").len(),
            2,
            "{v}"
        );
        let msg = v["error"]["message"].as_str().expect("message").to_owned();
        assert!(!msg.is_empty());
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{:?}",
            self.headers
        );
        msg
    }
}

/// A request to send: method, path, headers and body.
pub struct Req<'a> {
    method: &'a str,
    path: &'a str,
    auth: Option<&'a str>,
    pub content_type: Option<&'a str>,
    body: Vec<u8>,
    /// Send the headers only (with this declared `Content-Length`) and read the answer.
    pub declared_len: Option<usize>,
}

impl<'a> Req<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            auth: None,
            content_type: None,
            body: Vec::new(),
            declared_len: None,
        }
    }

    pub fn bearer(mut self, token: &'a str) -> Self {
        self.auth = Some(token);
        self
    }

    pub fn json(mut self, v: &Value) -> Self {
        self.content_type = Some("application/json");
        self.body = serde_json::to_vec(v).expect("json");
        self
    }

    pub fn raw(mut self, content_type: &'a str, body: &[u8]) -> Self {
        self.content_type = Some(content_type);
        self.body = body.to_vec();
        self
    }

    pub async fn send(self, addr: SocketAddr) -> Reply {
        tokio::time::timeout(WAIT, self.exchange(addr))
            .await
            .expect("HTTP exchange timed out")
    }

    async fn exchange(self, addr: SocketAddr) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
            self.method, self.path
        );
        if let Some(token) = self.auth {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(ct) = self.content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        let len = self.declared_len.unwrap_or(self.body.len());
        head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
        stream.write_all(head.as_bytes()).await.expect("write head");
        if self.declared_len.is_none() {
            stream.write_all(&self.body).await.expect("write body");
        }
        let mut raw = Vec::new();
        // The server may close without reading a refused body; what it sent first is in `raw`.
        let _ = stream.read_to_end(&mut raw).await;
        parse_reply(&raw)
    }
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = std::str::from_utf8(&data[..eol]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// Every `(key, value)` under `prefix`, whatever the type, as text.
pub async fn dump_redis(url: &str, prefix: &str) -> Vec<(String, String)> {
    let client = ::redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let mut out = Vec::new();
    for k in keys {
        assert!(
            k.starts_with(&format!("{prefix}:")),
            "key outside the prefix: {k}"
        );
        let kind: String = ::redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let value: Vec<String> = match kind.as_str() {
            "string" => vec![::redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("GET")],
            "hash" => ::redis::cmd("HGETALL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("HGETALL"),
            "zset" => ::redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .expect("ZRANGE"),
            "set" => ::redis::cmd("SMEMBERS")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("SMEMBERS"),
            "list" => ::redis::cmd("LRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .expect("LRANGE"),
            other => panic!("unexpected type {other} of {k}"),
        };
        out.push((k, value.join("\u{1f}")));
    }
    out
}
