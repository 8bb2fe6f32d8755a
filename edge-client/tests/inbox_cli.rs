//! `tandem-edge inbox` end to end, in process: the fake REST server of `inbox_support` and a
//! scripted fake cloud (WebSocket on 127.0.0.1:0) that checks the generation carries the
//! ticket and the partner's limits.

use tandem_testkit::tiny as common;
mod inbox_support;

use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use inbox_support::*;
use serde_json::json;
use tandem_edge::cli::{Cli, Command, Console, InboxReport};
use tandem_edge::inbox::InboxClient;
use tandem_edge::ClientConfig;
use tandem_protocol::{
    Done, DoneReason, FinishReason, Frame, Opened, ResumeToken, SessionId, Token,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[test]
fn the_device_token_is_not_in_debug_output() {
    let cfg = config("http://127.0.0.1:9");
    let client_cfg = ClientConfig::new("ws://127.0.0.1:9/v1/edge/ws").with_inbox(cfg.clone());
    let cli = Cli::try_parse_from([
        "tandem-edge",
        "inbox",
        "--api",
        "http://127.0.0.1:9",
        "--device-token",
        TOKEN,
        "--edge",
        "/nonexistent",
        "--list",
    ])
    .expect("arguments");
    let shown = format!(
        "{cfg:?} {client_cfg:?} {:?} {cli:?}",
        InboxClient::new(cfg.clone())
    );
    assert!(shown.contains("redacted"), "{shown}");
    assert!(!shown.contains("s3cr3t"), "the token leaked: {shown}");
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The next protocol frame; `None` when the device closed.
async fn recv(ws: &mut Ws) -> Option<Frame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the device went silent")
        {
            Some(Ok(Message::Binary(b))) => return Some(Frame::decode(&b).expect("frame")),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

async fn send(ws: &mut Ws, frame: Frame) {
    ws.send(Message::Binary(frame.encode().expect("encode").into()))
        .await
        .expect("send");
}

/// Receives a `Hidden`: its row count and whether it completes the input so far.
async fn hidden(ws: &mut Ws) -> (u32, bool) {
    match recv(ws).await {
        Some(Frame::Hidden(h)) => (h.token_count, h.complete),
        other => panic!("expected Hidden, got {other:?}"),
    }
}

/// Opens seen by the fake cloud: the prompt id (ticket) and max tokens.
type Opens = Arc<Mutex<Vec<(Option<String>, u32)>>>;

/// A scripted cloud: for each connection, records `Open`'s prompt id and max tokens, takes
/// the prompt, sends `Hello` and ` world`, then `Done`.
async fn fake_cloud(listener: TcpListener, opens: Opens) {
    while let Ok((stream, _)) = listener.accept().await {
        let opens = opens.clone();
        tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(stream).await.expect("ws");
            let Some(Frame::Open(open)) = recv(&mut ws).await else {
                panic!("expected Open");
            };
            opens
                .lock()
                .expect("lock")
                .push((open.prompt_id.clone(), open.max_tokens));
            let opened = Opened {
                session: SessionId(9),
                resume_token: ResumeToken([3; 32]),
                next_hidden_seq: 0,
            };
            send(&mut ws, Frame::Opened(opened)).await;
            let mut prompt_rows = 0;
            let mut frames = 0u64;
            loop {
                let (rows, complete) = hidden(&mut ws).await;
                prompt_rows += rows;
                frames += 1;
                if complete {
                    break;
                }
            }
            for (seq, text) in ["Hello", " world"].into_iter().enumerate() {
                let t = Token {
                    seq: seq as u64,
                    input_seq: frames - 1 + seq as u64,
                    draft: false,
                    last: false,
                    draft_cap: 0,
                    token_id: 70 + seq as u32,
                    text: Some(text.into()),
                };
                send(&mut ws, Frame::Token(t)).await;
                if seq == 0 {
                    assert_eq!(hidden(&mut ws).await, (1, true), "one hidden per token");
                }
            }
            let done = Done {
                reason: DoneReason::Finished(FinishReason::Length),
                prompt_tokens: prompt_rows,
                output_tokens: 2,
            };
            send(&mut ws, Frame::Done(done)).await;
            while recv(&mut ws).await.is_some() {}
        });
    }
}

/// Three waiting prompts: A from a partner the profile trusts, B that the profile cannot
/// fill, C from another partner.
async fn inbox_api() -> FakeApi {
    FakeApi::start(|req| {
        let path = req.path.as_str();
        match req.method.as_str() {
            "GET" => {
                let body = json!({"user_id": "alice", "items": [
                    item_json(ID_A, "Acme Shop", "Suggest a gift for someone who likes {{interests}}."),
                    item_json(ID_B, "Insurer", "Quote for {{ age }} years old."),
                    item_json(ID_C, "Other Co", "Say hi to {{ name }}."),
                ]});
                reply(200, &[], &body.to_string())
            }
            _ if path.ends_with("/decline") => reply(204, &[], ""),
            _ if path == format!("/v1/edge/inbox/{ID_A}/accept") => reply(
                200,
                &[],
                &accepted_json(ID_A, "Acme Shop", "Suggest a gift for someone who likes {{interests}}.")
                    .to_string(),
            ),
            _ if path == format!("/v1/edge/inbox/{ID_C}/accept") => {
                reply(200, &[], &accepted_json(ID_C, "Other Co", "Say hi to {{ name }}.").to_string())
            }
            _ => api_error(409, "conflict", &[]),
        }
    })
    .await
}

async fn run_cli(
    tiny: &Tiny,
    api: &str,
    ws: &str,
    extra: &[&str],
    answers: Option<&str>,
) -> (InboxReport, String, String) {
    let profile = tiny.dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"interests": ["jazz"], "name": "Jo", "auto_accept_partners": ["Acme Shop"]}"#,
    )
    .expect("profile");
    let split = tiny.dir.path().join("split");
    let mut argv = vec![
        "tandem-edge",
        "inbox",
        "--api",
        api,
        "--device-token",
        TOKEN,
        "--edge",
        split.to_str().expect("utf8"),
        "--server",
        ws,
        "--profile",
        profile.to_str().expect("utf8"),
    ];
    argv.extend_from_slice(extra);
    let Command::Inbox(args) = Cli::try_parse_from(argv).expect("arguments").command else {
        panic!("the inbox command");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut input = answers.map(|a| Cursor::new(a.as_bytes().to_vec()));
    let console = Console {
        out: &mut out,
        err: &mut err,
        answers: input
            .as_mut()
            .map(|c| c as &mut (dyn std::io::BufRead + Send)),
    };
    let report = tandem_edge::cli::inbox(args, console).await.expect("inbox");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf8");
    (report, text(out), text(err))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_inbox_answers_trusted_asks_the_rest_and_skips_unfillable() {
    let tiny = tiny();
    let api = inbox_api().await;
    let cloud = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws = format!("ws://{}/v1/edge/ws", cloud.local_addr().expect("addr"));
    let opens = Opens::default();
    tokio::spawn(fake_cloud(cloud, opens.clone()));

    // Interactive: A is trusted (profile), B cannot be filled (left waiting), C is asked: "n".
    let (report, out, err) =
        run_cli(&tiny, &api.url, &ws, &["--show-transparency"], Some("n\n")).await;
    assert_eq!(
        report,
        InboxReport {
            waiting: 3,
            answered: 1,
            declined: 1,
            left_waiting: 1,
            gone: 0,
            failed: 0,
        },
        "out:\n{out}\nerr:\n{err}"
    );
    assert!(out.contains("3 prompts waiting for alice:"), "{out}");
    assert!(out.contains("reads from your profile: interests"), "{out}");
    assert!(out.contains("`age`"), "B's missing field is named: {out}");
    assert!(out.contains("[1] Acme Shop:\nHello world\n"), "{out}");
    assert!(
        out.contains("Asked by Acme Shop (inbox prompt 00000000000000aa)"),
        "{out}"
    );
    assert!(err.contains("Answer [3] from Other Co?"), "{err}");
    assert!(err.contains("finished: length (2 output tokens"), "{err}");
    assert_eq!(
        api.calls()[1..],
        [
            format!("POST /v1/edge/inbox/{ID_A}/accept"),
            format!("POST /v1/edge/inbox/{ID_C}/decline"),
        ]
    );
    assert_eq!(
        *opens.lock().expect("lock"),
        [(Some(ticket_for(ID_A)), 3)],
        "the generation carries the ticket and the partner's max_tokens"
    );
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_inbox_yes_and_decline_others_without_a_terminal() {
    let tiny = tiny();
    let api = inbox_api().await;
    let cloud = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws = format!("ws://{}/v1/edge/ws", cloud.local_addr().expect("addr"));
    let opens = Opens::default();
    tokio::spawn(fake_cloud(cloud, opens.clone()));

    // --list: nothing but the GET.
    let (report, out, _) = run_cli(&tiny, &api.url, &ws, &["--list"], None).await;
    assert_eq!((report.waiting, report.left_waiting), (3, 3));
    assert!(
        out.contains("[3] Other Co (prompt 00000000000000cc"),
        "{out}"
    );
    assert_eq!(api.calls(), ["GET /v1/edge/inbox"]);

    // Nobody to ask: A is answered (the profile trusts Acme Shop), B (unfillable) and C
    // (nobody to ask) are declined.
    let (report, _, err) = run_cli(&tiny, &api.url, &ws, &["--decline-others"], None).await;
    assert_eq!(
        (
            report.answered,
            report.declined,
            report.left_waiting,
            report.failed
        ),
        (1, 2, 0, 0),
        "{err}"
    );
    // --yes: A and C answered, B still cannot be filled and stays.
    let (report, out, err) = run_cli(&tiny, &api.url, &ws, &["--yes"], None).await;
    assert_eq!(
        (
            report.answered,
            report.declined,
            report.left_waiting,
            report.failed
        ),
        (2, 0, 1, 0),
        "{err}"
    );
    assert!(out.contains("[3] Other Co:\nHello world\n"), "{out}");
    let tickets: Vec<Option<String>> = opens
        .lock()
        .expect("lock")
        .iter()
        .map(|o| o.0.clone())
        .collect();
    assert_eq!(
        tickets,
        [
            Some(ticket_for(ID_A)),
            Some(ticket_for(ID_A)),
            Some(ticket_for(ID_C)),
        ]
    );
}
