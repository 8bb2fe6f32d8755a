//! The inbox library: the REST calls against a fake HTTP server (`inbox_support`), answering
//! an accepted prompt (the request tied to the ticket, the system prompt as the shared
//! prefix, a missing field refused before anything is sent), and profile settings kept out
//! of templates. `inbox_cli.rs` drives `tandem-edge inbox` end to end.

use tandem_testkit::tiny as common;
mod inbox_support;

use std::time::Duration;

use inbox_support::*;
use serde_json::json;
use tandem_edge::inbox::{
    Accepted, ApiCode, DeviceToken, InboxClient, InboxConfig, InboxError, ItemStatus,
    PartnerPrompt, PromptContext, PromptId,
};
use tandem_edge::{ClientConfig, EdgeClient, Profile, PromptError, Sanitizer};
use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::tokenizer::TextTokenizer;
use tandem_protocol::SamplingParams;
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// REST calls
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_accept_decline_send_the_token_and_the_right_requests() {
    let api = FakeApi::start(|req| match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/edge/inbox") => {
            let body = json!({"user_id": "alice", "items": [
                item_json(ID_A, "Acme Shop", "Suggest a gift for someone who likes {{interests}}."),
            ]});
            reply(200, &[], &body.to_string())
        }
        ("POST", p) if p == format!("/v1/edge/inbox/{ID_A}/accept") => reply(
            200,
            &[],
            &accepted_json(ID_A, "Acme Shop", "Hi {{name}}").to_string(),
        ),
        ("POST", p) if p == format!("/v1/edge/inbox/{ID_A}/decline") => reply(204, &[], ""),
        _ => api_error(404, "not_found", &[]),
    })
    .await;
    let client = InboxClient::new(config(&api.url));

    let inbox = client.list().await.expect("list");
    assert_eq!(inbox.user_id, "alice");
    let [item] = inbox.items.as_slice() else {
        panic!("one item: {inbox:?}");
    };
    assert_eq!(item.prompt_id.as_str(), ID_A);
    assert_eq!(item.status, ItemStatus::Pending);
    assert_eq!(item.prompt.partner, "Acme Shop");
    assert_eq!(item.prompt.system(), Some(SYSTEM));
    assert_eq!(item.prompt.max_tokens, 3);
    assert_eq!(
        item.prompt.sampling,
        SamplingParams {
            temperature: 0.7,
            top_k: Some(20),
            seed: 42,
            ..SamplingParams::default()
        }
    );

    let id = PromptId::new(ID_A).expect("id");
    let accepted = client.accept(&id).await.expect("accept");
    assert_eq!(accepted.ticket.expose(), ticket_for(ID_A));
    assert_eq!(accepted.prompt.template, "Hi {{name}}");
    client.decline(&id).await.expect("decline");

    assert_eq!(
        api.calls(),
        [
            "GET /v1/edge/inbox".to_owned(),
            format!("POST /v1/edge/inbox/{ID_A}/accept"),
            format!("POST /v1/edge/inbox/{ID_A}/decline"),
        ]
    );
    for seen in api.seen() {
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(seen.header("host"), api.url.strip_prefix("http://"));
        if seen.method == "POST" {
            assert_eq!(seen.header("content-length"), Some("0"));
        }
    }
}

#[tokio::test]
async fn api_errors_are_typed_with_retry_after() {
    let api = FakeApi::start(|req| match req.path.as_str() {
        "/v1/edge/inbox" => api_error(401, "unauthorized", &[]),
        p if p.contains("/404") => api_error(404, "not_found", &[]),
        p if p.contains("/409") => api_error(409, "conflict", &[]),
        p if p.contains("/429") => api_error(429, "rate_limited", &[("retry-after", "7")]),
        p if p.contains("/503") => api_error(503, "unavailable", &[("Retry-After", "30")]),
        _ => reply(500, &[], "<html>oops</html>"),
    })
    .await;
    let client = InboxClient::new(config(&api.url));
    let err = client.list().await.expect_err("401");
    let shown = err.to_string();
    assert!(
        matches!(
            &err,
            InboxError::Api {
                status: 401,
                code: ApiCode::Unauthorized,
                retry_after: None,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!shown.contains(TOKEN) && !format!("{err:?}").contains(TOKEN));

    let cases = [
        ("404", 404, ApiCode::NotFound, None),
        ("409", 409, ApiCode::Conflict, None),
        ("429", 429, ApiCode::RateLimited, Some(7)),
        ("503", 503, ApiCode::Unavailable, Some(30)),
        ("500", 500, ApiCode::Other("http_500".into()), None),
    ];
    for (id, want_status, want_code, want_retry) in cases {
        let err = client
            .accept(&PromptId::new(id).expect("id"))
            .await
            .expect_err(id);
        let InboxError::Api {
            status,
            code,
            retry_after,
            message,
        } = &err
        else {
            panic!("{id}: {err:?}");
        };
        assert_eq!(*status, want_status, "{id}");
        assert_eq!(*code, want_code, "{id}");
        assert_eq!(retry_after.map(|d| d.as_secs()), want_retry, "{id}");
        assert!(!message.is_empty(), "{id}");
        if let Some(s) = want_retry {
            assert!(
                err.to_string().contains(&format!("retry after {s} s")),
                "{err}"
            );
        }
    }
}

#[tokio::test]
async fn oversize_answers_and_bad_bodies_are_refused() {
    let big = "x".repeat(4096);
    let api = FakeApi::start(move |req| match req.path.as_str() {
        // Declared too large.
        "/v1/edge/inbox" => reply(200, &[], &big),
        // Chunked, no length: caught while reading.
        p if p.contains("chunked") => {
            let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..8 {
                r.extend_from_slice(b"200\r\n");
                r.extend_from_slice(&[b'y'; 0x200]);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        }
        p if p.contains("wrongid") => reply(
            200,
            &[],
            &accepted_json(ID_B, "Acme Shop", "Hi").to_string(),
        ),
        _ => reply(200, &[], "{\"not\": \"an answer\"}"),
    })
    .await;
    let mut cfg = config(&api.url);
    cfg.max_response_bytes = 1024;
    let client = InboxClient::new(cfg);
    let err = client.list().await.expect_err("too large");
    assert!(
        matches!(err, InboxError::TooLarge { limit: 1024 }),
        "{err:?}"
    );
    let err = client
        .accept(&PromptId::new("chunked").expect("id"))
        .await
        .expect_err("too large");
    assert!(
        matches!(err, InboxError::TooLarge { limit: 1024 }),
        "{err:?}"
    );
    let err = client
        .accept(&PromptId::new("garbage").expect("id"))
        .await
        .expect_err("decode");
    assert!(matches!(err, InboxError::Decode(_)), "{err:?}");
    let err = client
        .accept(&PromptId::new("wrongid").expect("id"))
        .await
        .expect_err("another prompt's answer");
    assert!(matches!(err, InboxError::Decode(_)), "{err:?}");
}

#[tokio::test]
async fn https_bad_urls_silence_and_no_server_are_errors() {
    let token = || DeviceToken::new(TOKEN).expect("token");
    let cfg = InboxConfig::new("https://api.example.test", token()).expect("https");
    assert_eq!(cfg.api_base(), "https://api.example.test");
    for bad in ["ftp://x", "127.0.0.1:80", "http://u:p@host"] {
        assert!(
            matches!(InboxConfig::new(bad, token()), Err(InboxError::Config(_))),
            "{bad}"
        );
    }

    // A server that accepts and never answers: the timeout ends the call.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = config(&url);
    cfg.timeout = Duration::from_millis(300);
    let err = InboxClient::new(cfg).list().await.expect_err("timeout");
    assert!(matches!(err, InboxError::Transport(_)), "{err:?}");

    // Nothing listening.
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", free.local_addr().expect("addr"));
    drop(free);
    let err = InboxClient::new(config(&url))
        .list()
        .await
        .expect_err("refused");
    assert!(matches!(err, InboxError::Transport(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Answering
// ---------------------------------------------------------------------------------------------

/// The tiny byte-level tokenizer and its ChatML template.
fn text_tools() -> (tempfile::TempDir, TextTokenizer, ChatTemplate) {
    let dir = tempfile::tempdir().expect("tmp");
    common::write_tokenizer(dir.path());
    let tok = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).expect("tokenizer");
    let chat = ChatTemplate::from_tokenizer_config(&dir.path().join("tokenizer_config.json"))
        .expect("config")
        .expect("template");
    (dir, tok, chat)
}

fn accepted(template: &str) -> Accepted {
    serde_json::from_value(accepted_json(ID_A, "Acme Shop", template)).expect("accepted")
}

fn model_info() -> tandem_edge::ModelInfo {
    tandem_edge::ModelInfo {
        split_depth: 1,
        num_layers: 4,
        model_pair_id: "pair".into(),
        hidden_size: 64,
    }
}

#[test]
fn an_accepted_prompt_becomes_a_request_tied_to_its_ticket() {
    let (_dir, tok, chat) = text_tools();
    let profile = Profile::from_json_str(
        r#"{"interests": ["jazz", "hiking"], "email": "jo@example.com",
            "auto_accept_partners": ["Acme Shop"]}"#,
    )
    .expect("profile");
    let sanitizer = Sanitizer::default();
    let ctx = PromptContext {
        profile: &profile,
        sanitizer: &sanitizer,
        tokenizer: &tok,
        chat_template: Some(&chat),
    };
    let acc = accepted("Suggest a gift for someone who likes {{interests}}.");
    let req = acc.request(&ctx, model_info()).expect("request");

    assert_eq!(req.prompt_id.as_deref(), Some(ticket_for(ID_A).as_str()));
    assert_eq!(req.max_tokens, 3);
    assert_eq!(req.sampling, acc.prompt.sampling);
    assert!(req.stop.is_empty());
    let system_only = chat
        .render(&[ChatMessage::system(SYSTEM)], false)
        .expect("render");
    let system_ids = tok.encode(&system_only, false).expect("encode");
    assert!(req.system_prefix_len > 0);
    assert_eq!(
        &req.prompt[..req.system_prefix_len],
        &system_ids[..req.system_prefix_len]
    );
    let full = tok.decode(&req.prompt, false).expect("decode");
    assert!(full.contains("likes jazz, hiking."), "{full}");
    assert!(
        full.starts_with(&format!("<|im_start|>system\n{SYSTEM}")),
        "{full}"
    );

    let record = req.record.as_ref().expect("record");
    assert_eq!(record.partner.as_deref(), Some("Acme Shop"));
    assert_eq!(record.prompt_id.as_deref(), Some(ID_A));
    assert_eq!(record.system_prompt.as_deref(), Some(SYSTEM));
    assert_eq!(record.shared_prefix_tokens, req.system_prefix_len);
    assert_eq!(record.fields_used.len(), 1);
    assert!(record
        .render_text()
        .contains("Asked by Acme Shop (inbox prompt"));
    // The ticket is a credential: not in the record, not in the accepted prompt's Debug.
    let json = serde_json::to_string(record).expect("json");
    assert!(!json.contains("tkt_"), "{json}");
    assert!(!format!("{acc:?}").contains("tkt_"));
    // A record without a partner serializes as before (no new keys).
    let mut plain = record.clone();
    plain.partner = None;
    plain.prompt_id = None;
    let v = serde_json::to_value(&plain).expect("json");
    assert!(v.get("partner").is_none() && v.get("prompt_id").is_none());
}

#[test]
fn a_missing_profile_field_is_an_error_and_settings_are_not_fields() {
    let (_dir, tok, chat) = text_tools();
    let profile =
        Profile::from_json_str(r#"{"name": "Jo", "auto_accept_partners": ["Acme Shop"]}"#)
            .expect("profile");
    assert_eq!(profile.settings().auto_accept_partners, ["Acme Shop"]);
    assert_eq!(profile.field_names().collect::<Vec<_>>(), ["name"]);
    assert!(profile.get("auto_accept_partners").is_none());
    let sanitizer = Sanitizer::none();
    let ctx = PromptContext {
        profile: &profile,
        sanitizer: &sanitizer,
        tokenizer: &tok,
        chat_template: Some(&chat),
    };
    for template in [
        "Hi {{ name }}, your budget is {{ budget }}.",
        "Trusted: {{ auto_accept_partners }}",
    ] {
        let err = accepted(template)
            .request(&ctx, model_info())
            .expect_err(template);
        assert!(
            matches!(&err, PromptError::MissingFields { fields } if fields.len() == 1),
            "{template}: {err:?}"
        );
    }
    let probe = PartnerPrompt {
        template: "{% if auto_accept_partners is defined %}leak{% else %}ok{% endif %}".into(),
        ..accepted("x").prompt
    };
    let assembled = probe.assemble(&ctx).expect("assemble");
    assert_eq!(assembled.user_prompt, "ok");
    assert!(assembled.fields_used.is_empty());

    for bad in [
        r#"{"auto_accept_partners": "Acme Shop"}"#,
        r#"{"auto_accept_partners": ["Acme Shop", 3]}"#,
    ] {
        let err = Profile::from_json_str(bad).expect_err(bad);
        assert!(
            matches!(
                err,
                PromptError::ProfileSetting {
                    key: "auto_accept_partners",
                    ..
                }
            ),
            "{bad}: {err:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// With a model: EdgeClient and the CLI
// ---------------------------------------------------------------------------------------------
#[tokio::test]
async fn edge_client_answers_only_with_an_inbox_and_a_fillable_prompt() {
    let tiny = tiny();
    let cloud = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws = format!("ws://{}/v1/edge/ws", cloud.local_addr().expect("addr"));
    let bare = EdgeClient::from_bundle(&tiny.bundle, ClientConfig::new(ws.as_str())).expect("c");
    assert!(matches!(bare.inbox().await, Err(InboxError::Config(_))));

    let client = EdgeClient::from_bundle(
        &tiny.bundle,
        ClientConfig::new(ws.as_str()).with_inbox(config("http://127.0.0.1:9")),
    )
    .expect("client");
    let profile = Profile::from_json_str(r#"{"name": "Jo"}"#).expect("profile");
    let sanitizer = Sanitizer::default();
    let ctx = PromptContext::from_bundle(&tiny.bundle, &profile, &sanitizer).expect("ctx");
    let err = client
        .answer(&accepted("Hi {{ name }}, budget {{ budget }}"), &ctx)
        .expect_err("missing field");
    assert!(
        matches!(err, InboxError::Prompt(PromptError::MissingFields { .. })),
        "{err:?}"
    );
    let nothing = tokio::time::timeout(Duration::from_millis(300), cloud.accept()).await;
    assert!(
        nothing.is_err(),
        "nothing may be sent for an unfillable prompt"
    );
}
