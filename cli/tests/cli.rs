//! The `tandem` binary end to end: `split` then `generate`, on a tiny generated model (always)
//! and on the demo model (when present).

use tandem_testkit::tiny as common;

use std::path::Path;
use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tandem")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tandem failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(ok(out).trim()).expect("one JSON object on stdout")
}

fn tiny_model(dir: &Path) {
    let spec = &common::specs()[0];
    common::write_hf(dir, spec);
    common::write_tokenizer(dir);
}

#[test]
fn split_then_generate_matches_in_memory_split() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny");
    tiny_model(&model);
    let out = tmp.path().join("split");
    let m = model.to_str().expect("utf8");
    let o = out.to_str().expect("utf8");
    let split = tandem(&[
        "split",
        "--model",
        m,
        "--edge-layers",
        "2",
        "--out",
        o,
        "--quiet",
    ]);
    ok(&split);
    let stderr = String::from_utf8_lossy(&split.stderr);
    assert!(stderr.contains("pair id"), "{stderr}");
    for part in ["edge", "cloud"] {
        for f in [
            "model.safetensors",
            "config.json",
            "manifest.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(part).join(f).is_file(), "{part}/{f} missing");
        }
    }

    let gen = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "hello world",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&tandem(&args))
    };
    let whole = gen(m, &["--edge-layers", "2"]);
    let parts = gen(o, &[]);
    assert_eq!(whole["output_ids"], parts["output_ids"]);
    assert_eq!(whole["prompt_ids"], parts["prompt_ids"]);
    assert_eq!(parts["edge_layers"], 2);
    let ids = parts["output_ids"].as_array().expect("ids");
    let finish = parts["finish_reason"].as_str().expect("finish");
    assert!(ids.len() <= 12);
    assert!(finish == "length" || finish == "eos", "{finish}");
    if finish == "length" {
        assert_eq!(ids.len(), 12);
    }
    assert!(parts["text"].is_string());
    // "hello world" through the byte-level tokenizer: "hell" merges, so fewer ids than bytes.
    let prompt = parts["prompt_ids"].as_array().expect("prompt ids");
    assert!(
        !prompt.is_empty() && prompt.len() < "hello world".len(),
        "{prompt:?}"
    );

    // Chat mode renders the template: the prompt starts with <|im_start|> (id 1).
    let chat = gen(o, &["--chat", "--system", "be brief"]);
    assert_eq!(chat["prompt_ids"][0], 1);
    // Seeded sampling is reproducible.
    let s1 = gen(
        o,
        &["--temperature", "0.9", "--top-p", "0.9", "--seed", "4"],
    );
    let s2 = gen(
        o,
        &["--temperature", "0.9", "--top-p", "0.9", "--seed", "4"],
    );
    assert_eq!(s1["output_ids"], s2["output_ids"]);
}

#[test]
fn bad_arguments_fail_with_clear_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny");
    tiny_model(&model);
    let m = model.to_str().expect("utf8");
    let out = tandem(&[
        "generate",
        "--model",
        m,
        "--edge-layers",
        "9",
        "--prompt",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 1 and 3"));
    let out = tandem(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--temperature=-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
    let out = tandem(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}

#[test]
fn demo_model_answers_paris_split_at_1_and_3() {
    let Some(gguf) = common::demo_model() else {
        return;
    };
    let g = gguf.to_str().expect("utf8");
    for k in ["1", "3"] {
        let v = json(&tandem(&[
            "generate",
            "--model",
            g,
            "--edge-layers",
            k,
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "32",
            "--json",
        ]));
        let text = v["text"].as_str().expect("text");
        println!("k={k}: {text:?}");
        assert!(
            text.contains("Paris"),
            "k={k}: answer without Paris: {text:?}"
        );
    }
}

#[test]
fn demo_model_split_on_disk_equals_in_memory() {
    let Some(gguf) = common::demo_model() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("split");
    let (g, o) = (gguf.to_str().expect("utf8"), out.to_str().expect("utf8"));
    ok(&tandem(&[
        "split",
        "--model",
        g,
        "--edge-layers",
        "3",
        "--out",
        o,
        "--quiet",
    ]));
    let args = |m: &str| {
        let mut a = vec![
            "generate",
            "--model",
            m,
            "--chat",
            "--prompt",
            "Name three colours.",
            "--max-tokens",
            "16",
            "--json",
        ];
        if m == g {
            a.extend(["--edge-layers", "3"]);
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |m: &str| {
        let a = args(m);
        json(&tandem(&a.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let (whole, parts) = (run(g), run(o));
    assert_eq!(whole["prompt_ids"], parts["prompt_ids"]);
    assert_eq!(whole["output_ids"], parts["output_ids"]);
}

/// `tandem random-model --shape tiny` then `tandem device-check` with the CPU as the device:
/// the check's own machinery (reference recording, batched and solo replays through the
/// paged cache, the engine end to end) runs and passes against itself, in f32 and in bf16.
/// On a GPU machine scripts/gpu-check.sh runs the same command with `--device cuda`.
#[test]
fn device_check_on_the_cpu_passes_against_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny");
    let m = model.to_str().expect("utf8");
    ok(&tandem(&["random-model", "--shape", "tiny", "--out", m]));
    let base = [
        "device-check",
        "--model",
        m,
        "--edge-layers",
        "1",
        "--device",
        "cpu",
    ];
    let f32 = json(&tandem(
        &[&base[..], &["--sessions", "3", "--steps", "6"]].concat(),
    ));
    assert_eq!(f32["passed"], true, "{f32}");
    assert_eq!(f32["device_vs_cpu"]["max_abs_logit_diff"], 0.0, "{f32}");
    assert_eq!(f32["device_vs_cpu"]["greedy_steps_compared"], 3 * 7);
    assert_eq!(f32["engine_vs_cpu_solo"]["identical"], 3);
    let bf16 = json(&tandem(
        &[
            &base[..],
            &["--dtype", "bf16", "--sessions", "2", "--steps", "4"],
        ]
        .concat(),
    ));
    assert_eq!(bf16["dtype"], "bf16");
    // bf16 weights differ from the f32 reference, but not by much on a random model.
    let diff = bf16["device_vs_cpu"]["max_abs_logit_diff"]
        .as_f64()
        .expect("diff");
    assert!(diff > 0.0 && diff < 0.5, "{bf16}");
    assert_eq!(bf16["batched_vs_solo_on_device"]["greedy_disagreements"], 0);
}

/// A build without the `cuda` feature names the feature when asked for a GPU, and fails.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_cpu_build_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("tiny");
    tiny_model(&model);
    let m = model.to_str().expect("utf8");
    for args in [
        &["device-check", "--model", m, "--edge-layers", "1"][..],
        &[
            "generate", "--model", m, "--prompt", "x", "--device", "cuda:1",
        ][..],
        &["bench", "--model", m, "--device", "cuda"][..],
    ] {
        let out = tandem(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--features cuda"), "{args:?}: {err}");
    }
    let out = tandem(&["generate", "--model", m, "--prompt", "x", "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device"));
}

#[test]
fn serve_and_admin_name_the_operator_listener() {
    let serve = ok(&tandem(&["serve", "--help"]));
    assert!(serve.contains("--admin-listen"), "{serve}");
    assert!(serve.contains("127.0.0.1:9091"), "{serve}");
    let admin = ok(&tandem(&["admin", "--help"]));
    assert!(admin.contains("--admin-url"), "{admin}");
    assert!(admin.contains("http://127.0.0.1:9091"), "{admin}");
    // A bad address is refused before anything starts.
    let bad = tandem(&["serve", "--cloud", "x", "--admin-listen", "localhost"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("admin_listen"), "{stderr}");
}
