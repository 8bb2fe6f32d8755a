//! `tandem audit-privacy`, the command: on a tiny generated model it prints its table and its
//! JSON (the audit itself is tested in `privacy/tests/`).

use std::path::Path;
use std::process::Command;

use tandem_testkit::tiny as common;

use tandem_privacy::prompts;

fn tiny_model(dir: &Path) {
    let spec = &common::specs()[0];
    common::write_hf(dir, spec);
    common::write_tokenizer(dir);
}

#[test]
fn the_command_prints_a_table_and_json() {
    let tmp = tempfile::tempdir().expect("tmp");
    tiny_model(tmp.path());
    let model = tmp.path().to_str().expect("utf8");
    let out = audit_cli(&["--model", model, "--edge-layers", "1,2", "--cost-only"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    let out = audit_cli(&[
        "--model",
        model,
        "--noise",
        "none",
        "--gen-tokens",
        "2",
        "--random-sequences",
        "2",
        "--shortlist",
        "8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cells"].as_array().expect("cells").len(), 1);
    assert_eq!(
        v["prompts"].as_array().expect("prompts").len(),
        prompts::BUILTIN.len()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("[audit"));
}

/// Runs `tandem audit-privacy ARGS` and answers its output; it must succeed.
fn audit_cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("audit-privacy")
        .args(args)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
