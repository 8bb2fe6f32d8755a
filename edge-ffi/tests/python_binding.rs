//! The device library through its generated bindings: Python, Kotlin and Swift sources are
//! generated from the built shared library by UniFFI's generator (this crate's
//! `uniffi-bindgen`), and `tests/binding_test.py` drives the Python one against a live
//! `tandem serve` (in process, 127.0.0.1:0, tiny model): greedy output equal to the Rust
//! client's, streaming callbacks, profile fields, errors, cancel.

use tandem_testkit::tiny as common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::DType;
use tandem_edge::{
    assemble, ClientConfig, EdgeBundle, EdgeClient, GenerateRequest, Profile, PromptTemplate,
    Sanitizer,
};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_serve::server::{self, ServerConfig};

const PROMPT: &str = "I live in {{ city }}. Suggest a gift.";
const MAX_TOKENS: u32 = 12;

/// The shared library cargo built for this test run (`target/<profile>/libtandem_edge_ffi.so`).
fn shared_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let deps = exe.parent().expect("deps dir");
    let name = format!(
        "{}tandem_edge_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [
        deps.join(&name),
        deps.parent().expect("profile dir").join(&name),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| panic!("{name} was not built next to {}", deps.display()))
}

fn generate_bindings(language: &str, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--no-format", "--library"])
        .arg(shared_library())
        .args(["--language", language, "--out-dir"])
        .arg(out)
        .status()
        .expect("run uniffi-bindgen");
    assert!(
        status.success(),
        "uniffi-bindgen --language {language}: {status}"
    );
}

/// What the Rust client produces for the same prompt and profile (greedy).
async fn rust_reference(bundle: &EdgeBundle, url: &str) -> (String, Vec<u32>) {
    let profile = Profile::from_json_str(r#"{"city": "Paris", "email": "jane.doe@example.com"}"#)
        .expect("profile");
    let template = PromptTemplate::new(PROMPT).expect("template");
    let assembled = assemble(
        None,
        &template,
        &profile,
        &Sanitizer::default(),
        bundle.chat_template.as_ref(),
        bundle.tokenizer.as_ref().expect("tokenizer"),
    )
    .expect("assemble");
    let client = EdgeClient::from_bundle(bundle, ClientConfig::new(url)).expect("client");
    let mut req = GenerateRequest::from_assembled(&assembled);
    req.max_tokens = MAX_TOKENS;
    let done = client
        .generate(req)
        .expect("generate")
        .finish()
        .await
        .expect("finish");
    (done.text, done.token_ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_binding_generates_what_the_rust_client_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let hf = dir.path().join("hf");
    common::write_hf(&hf, &common::specs()[0]);
    common::write_tokenizer(&hf);
    let ck = Checkpoint::open(&hf).expect("open");
    let split = dir.path().join("split");
    let opts = SplitOptions {
        edge_layers: 1,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, &split, &opts).expect("split");
    let server = server::start(ServerConfig {
        cloud: split.join("cloud"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: tandem_serve::server::AdminListen::On(([127, 0, 0, 1], 0).into()),
        kv_cache_gib: 0.02,
        ..ServerConfig::default()
    })
    .await
    .expect("server");
    let url = server.ws_url();
    let bundle = EdgeBundle::load(&split).expect("edge");
    let (text, ids) = rust_reference(&bundle, url.as_str()).await;
    assert_eq!(ids.len(), MAX_TOKENS as usize);

    let out = dir.path().join("bindings");
    for language in ["python", "kotlin", "swift"] {
        generate_bindings(language, &out.join(language));
    }
    // Kotlin and Swift: generated and complete enough to name the API (compiled by the apps'
    // own toolchains, which CI does not have).
    let kotlin =
        std::fs::read_to_string(out.join("kotlin/uniffi/tandem_edge_ffi/tandem_edge_ffi.kt"))
            .expect("kotlin source");
    let swift = std::fs::read_to_string(out.join("swift/tandem_edge_ffi.swift")).expect("swift");
    for api in [
        "TandemEdge",
        "GenerationHandle",
        "TextListener",
        "Completion",
        "openWithToken",
    ] {
        assert!(kotlin.contains(api), "kotlin lacks {api}");
        assert!(swift.contains(api), "swift lacks {api}");
    }
    // Python: the generated module and the library side by side, then the script.
    let py = out.join("python");
    std::fs::copy(
        shared_library(),
        py.join(shared_library().file_name().expect("name")),
    )
    .expect("copy library");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/binding_test.py");
    let edge_dir = split.join("edge");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("TANDEM_BINDING_DIR", &py)
            .env("TANDEM_EDGE_DIR", &edge_dir)
            .env("TANDEM_SERVER_URL", url.as_str())
            .env("TANDEM_PROMPT", PROMPT)
            .env("TANDEM_EXPECTED_TEXT", &text)
            .env("TANDEM_EXPECTED_IDS", format!("{ids:?}"))
            .env("TANDEM_MAX_TOKENS", MAX_TOKENS.to_string())
            .output()
            .expect("run python3")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("python binding: OK"),
        "the Python binding test failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    server.shutdown().await;
}
