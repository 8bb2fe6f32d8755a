//! The official `openai` Python package (PyPI, pinned by scripts/openai-sdk.sh) drives the
//! device's OpenAI-compatible endpoint against a live `tandem serve` on the demo model
//! (both in process, on 127.0.0.1:0): greedy output equal to `tandem-edge run`'s, the
//! stream's deltas adding up to the whole answer, usage equal to the token counts, refused
//! parameters raised by the SDK as `BadRequestError` with the right `param`.
//!
//! The Python side is tests/openai_sdk.py; it reports what the SDK returned as JSON and the
//! checks are here. Python is found through `TANDEM_OPENAI_PYTHON`, else the venv that
//! scripts/openai-sdk.sh makes (target/openai-venv), else `python3`, whichever imports
//! `openai`. Without one, or without the demo model, the test skips with a loud message,
//! unless `TANDEM_REQUIRE_OPENAI=1` (or `TANDEM_REQUIRE_DEMO=1`): then it fails.

use tandem_testkit::tiny as common;
mod openai_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use openai_support::{http, Live};
use serde_json::{json, Value};
use tandem_edge::cli::{Cli, Command as EdgeCommand};
use tandem_edge::{EdgeClient, GenerateRequest, Profile};

const SYSTEM: &str = "You are a helpful shopping assistant.";
const MAX_TOKENS: u32 = 24;
const COMPLETION_PROMPT: &str = "The capital of France is";
const API_KEY: &str = "sk-tandem-local";

/// A Python that can `import openai`, or `None` (after saying why) to skip.
fn openai_python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openai-venv/bin/python");
    let candidates: Vec<PathBuf> = std::env::var_os("TANDEM_OPENAI_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([venv, PathBuf::from("python3")])
        .collect();
    for py in &candidates {
        let ok = Command::new(py)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py.clone());
        }
    }
    let why = format!(
        "no Python with the openai package (tried {candidates:?}; run scripts/openai-sdk.sh)"
    );
    if std::env::var("TANDEM_REQUIRE_OPENAI").as_deref() == Ok("1") {
        panic!("{why} and TANDEM_REQUIRE_OPENAI=1");
    }
    eprintln!("\n*** SKIPPED: the OpenAI SDK test did not run: {why} ***\n");
    None
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_drives_the_endpoint_on_the_demo_model() {
    let Some(gguf) = common::demo_model() else {
        return;
    };
    let Some(python) = openai_python() else {
        return;
    };
    let live = Live::demo(&gguf).await;
    let profile_path = examples().join("profile.json");
    let prompt_path = examples().join("gift-prompt.txt");
    let template = std::fs::read_to_string(&prompt_path).expect("prompt");

    // What `tandem-edge run` answers for the same template, profile and system prompt.
    let edge = live.edge_dir();
    let ws = live.server.ws_url();
    let max = MAX_TOKENS.to_string();
    let argv = [
        "tandem-edge",
        "run",
        "--edge",
        edge.to_str().expect("path"),
        "--server",
        &ws,
        "--profile",
        profile_path.to_str().expect("path"),
        "--prompt-file",
        prompt_path.to_str().expect("path"),
        "--system",
        SYSTEM,
        "--max-tokens",
        &max,
        "--json",
    ];
    let EdgeCommand::Run(args) = Cli::try_parse_from(argv).expect("argv").command else {
        panic!("run");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let want = tandem_edge::cli::run(args, &mut out, &mut err)
        .await
        .expect("tandem-edge run");
    assert!(!want.text.trim().is_empty(), "run produced text");

    let ep = live
        .endpoint(|c| {
            c.profile = Profile::from_file(&profile_path).expect("profile");
            c.system_prompt = Some(SYSTEM.into());
            c.api_key = Some(API_KEY.into());
        })
        .await;
    let cfg = json!({
        "base_url": ep.base_url(), "api_key": API_KEY, "model": ep.model_id(),
        "template": template, "max_tokens": MAX_TOKENS, "completion_prompt": COMPLETION_PROMPT,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let run = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(cfg.to_string())
            .output()
    });
    let output = run.await.expect("join").expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK script failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    println!("openai {} against {}", got["openai_version"], ep.model_id());

    // The whole answer: `tandem-edge run`'s greedy output, real token counts.
    let whole = &got["whole"];
    assert_eq!(whole["type"], "ChatCompletion");
    assert_eq!(whole["role"], "assistant");
    assert_eq!(
        whole["content"],
        want.text.as_str(),
        "greedy output equals tandem-edge run's"
    );
    let usage = json!({
        "prompt_tokens": want.usage.prompt_tokens,
        "completion_tokens": want.token_ids.len(),
        "total_tokens": want.usage.prompt_tokens as usize + want.token_ids.len(),
    });
    assert_eq!(whole["usage"], usage);
    let reason = if want.token_ids.len() == MAX_TOKENS as usize {
        "length"
    } else {
        "stop"
    };
    assert_eq!(whole["finish_reason"], reason);
    let record_id = whole["record_id"]
        .as_str()
        .expect("the transparency header");
    assert_eq!(whole["id"], record_id);

    // The stream: one id, deltas adding up to the whole answer, the same usage.
    let stream = &got["stream"];
    assert_eq!(stream["chunk_types"], json!(["ChatCompletionChunk"]));
    assert_eq!(stream["text"], whole["content"]);
    assert!(
        stream["deltas"].as_u64().is_some_and(|n| n > 1),
        "streamed in pieces"
    );
    assert_eq!(stream["finish_reasons"], json!([reason]));
    assert_eq!(stream["ids"].as_array().map(Vec::len), Some(1));
    assert_eq!(stream["usage"], usage);

    // Refused parameters: the SDK raises BadRequestError naming each.
    for param in ["n", "tools", "response_format", "logprobs"] {
        let e = &got["errors"][param];
        assert_eq!(e["class"], "BadRequestError", "{param}: {e}");
        assert_eq!(e["is_bad_request"], true);
        assert_eq!(e["status"], 400);
        assert_eq!(e["param"], param);
        assert_eq!(e["code"], "unsupported_parameter");
        assert_eq!(e["type"], "invalid_request_error");
    }
    assert_eq!(got["models"], json!([ep.model_id()]));

    // /v1/completions: the raw prompt's tokens, the client library's greedy output.
    let tokenizer = live.bundle.tokenizer.as_ref().expect("tokenizer");
    let ids = tokenizer.encode(COMPLETION_PROMPT, true).expect("encode");
    let completion = &got["completion"];
    assert_eq!(completion["type"], "Completion");
    assert_eq!(completion["usage"]["prompt_tokens"], ids.len());
    let client = EdgeClient::from_bundle(&live.bundle, live.client_config()).expect("client");
    let mut req = GenerateRequest::new(ids);
    req.max_tokens = 5;
    let direct = client
        .generate(req)
        .expect("generate")
        .finish()
        .await
        .expect("direct");
    assert_eq!(completion["text"], direct.text.as_str());
    assert_eq!(
        completion["usage"]["completion_tokens"],
        direct.token_ids.len()
    );

    // The record of the SDK's first completion, by the id in its header.
    let auth = format!("Bearer {API_KEY}");
    let path = format!("/v1/tandem/transparency/{record_id}");
    let rec = http(ep.addr(), "GET", &path, &[("authorization", &auth)], None).await;
    assert_eq!(rec.status, 200);
    let rec = rec.json();
    assert_eq!(rec["user"], "sdk-test");
    assert_eq!(rec["record"]["output"], want.text.as_str());
    assert_eq!(
        rec["record"]["user_prompt"],
        want.record.as_ref().expect("record").user_prompt
    );
    ep.shutdown().await;
}
