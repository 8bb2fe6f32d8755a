//! `tandem audit-privacy` on a tiny generated model: with no noise the attack reads the
//! prompt back at k = 1; noise makes it fail progressively; the same seed gives the same
//! report. (The command's table and JSON: `serve/tests/audit_cli.rs`, beside the binary.)

use tandem_testkit::tiny as common;

use std::path::Path;

use tandem_model::checkpoint::Checkpoint;
use tandem_privacy::prompts::{self, GENERIC_TEXT};
use tandem_privacy::{audit, AuditInputs, AuditReport, AuditSettings, NoiseLevel};
use tandem_protocol::HiddenDtype;

fn tiny_model(dir: &Path) -> Checkpoint {
    let spec = &common::specs()[0];
    common::write_hf(dir, spec);
    common::write_tokenizer(dir);
    Checkpoint::open(dir).expect("open tiny model")
}

fn run(ck: &Checkpoint, settings: &AuditSettings) -> AuditReport {
    let tok = ck.tokenizer.as_ref().expect("tokenizer");
    // Two built-in prompts keep the test fast (the tiny tokenizer is nearly byte-level).
    let prompts: Vec<_> = prompts::BUILTIN[..2]
        .iter()
        .map(|(name, text)| prompts::tokenize(tok, name, text).expect("tokenize"))
        .collect();
    let generic = tok.encode(GENERIC_TEXT, false).expect("encode");
    let excluded: Vec<u32> = (0..ck.config.vocab_size as u32)
        .filter(|&t| tok.is_special(t))
        .collect();
    let inputs = AuditInputs {
        prompts: &prompts,
        generic: &generic[..400.min(generic.len())],
        excluded,
        bos: tok.bos_token().map(|b| b.id),
        earlier: &[],
    };
    audit(ck, &inputs, settings, &mut |_| {}).expect("audit")
}

fn levels() -> Vec<NoiseLevel> {
    ["none", "1000", "100", "10", "1"]
        .iter()
        .map(|s| s.parse().expect("level"))
        .collect()
}

#[test]
fn recovery_is_near_total_without_noise_and_falls_with_noise() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path());
    let settings = AuditSettings {
        edge_layers: vec![1],
        noise: levels(),
        gen_tokens: 4,
        random_sequences: 8,
        shortlist: 400,
        seed: 5,
        ..AuditSettings::default()
    };
    let report = run(&ck, &settings);
    let cells = &report.cells;
    assert_eq!(cells.len(), 5);
    let clean = &cells[0];
    assert!(
        clean.tokens > 50 && clean.sensitive_tokens > 10,
        "{clean:?}"
    );
    // The attack works: nearly every token, sensitive ones included, comes back.
    assert!(
        clean.nn_recovery >= 0.95,
        "no-noise recovery {}",
        clean.nn_recovery
    );
    assert!(clean.nn_sensitive_recovery >= 0.95, "{clean:?}");
    // And the audit's own plumbing is exact without noise.
    assert_eq!(clean.greedy_agreement, 1.0);
    assert!(
        clean.max_logit_drift < 1e-3,
        "drift {}",
        clean.max_logit_drift
    );
    // More noise, less recovery: non-increasing within 5 points, and far lower at eps = 1.
    for w in cells.windows(2) {
        assert!(
            w[1].nn_recovery <= w[0].nn_recovery + 0.05,
            "{} -> {}: {} then {}",
            w[0].noise,
            w[1].noise,
            w[0].nn_recovery,
            w[1].nn_recovery
        );
        assert!(w[1].sigma >= w[0].sigma);
    }
    let last = cells.last().expect("cells");
    assert!(
        last.nn_recovery < 0.5,
        "eps=1 still recovers {}",
        last.nn_recovery
    );
    assert!(last.learned_recovery < 0.5, "{last:?}");
    // Privacy costs utility.
    assert!(last.greedy_agreement <= clean.greedy_agreement);
    assert!(last.max_logit_drift > clean.max_logit_drift);
}

#[test]
fn same_seed_same_report_and_wire_sizes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path());
    let settings = AuditSettings {
        edge_layers: vec![2],
        wire: vec![HiddenDtype::F32, HiddenDtype::Int8, HiddenDtype::Int4],
        noise: vec!["10".parse().expect("level")],
        gen_tokens: 3,
        random_sequences: 4,
        shortlist: 16,
        seed: 9,
        ..AuditSettings::default()
    };
    let strip = |r: &AuditReport| {
        let mut v = serde_json::to_value(r).expect("json");
        for c in v["cells"].as_array_mut().expect("cells") {
            let c = c.as_object_mut().expect("cell");
            c.remove("seconds");
            if let Some(e) = c.get_mut("exhaustive").and_then(|e| e.as_object_mut()) {
                e.remove("seconds");
            }
        }
        v
    };
    let a = run(&ck, &settings);
    let b = run(&ck, &settings);
    assert_eq!(strip(&a), strip(&b));
    let other = run(
        &ck,
        &AuditSettings {
            seed: 10,
            ..settings.clone()
        },
    );
    assert_ne!(strip(&a), strip(&other), "the seed must matter under noise");
    // Hidden size 64: f32 is 256 bytes a token, int8 64 + a 4-byte scale, int4 8 outliers
    // (32 bytes) + 2 group scales (4) + 32 bytes of nibbles.
    assert_eq!(a.cells[0].payload_bytes_per_token, 256);
    assert_eq!(a.cells[1].payload_bytes_per_token, 68);
    assert_eq!(a.cells[2].wire, "int4");
    assert_eq!(a.cells[2].payload_bytes_per_token, 68);
    for c in &a.cells {
        // The mean of the steps' largest drifts is at most the largest, and noise moves both.
        assert!(
            c.mean_logit_drift > 0.0 && c.mean_logit_drift <= c.max_logit_drift,
            "{c:?}"
        );
    }
    assert_eq!(a.costs[0].edge_layers, 2);
    assert!(a.costs[0].flops_per_token > 0 && a.costs[0].kv_bytes_per_token_f32 == 2 * 2 * 32 * 4);
}
