//! The audit's stronger attacks on tiny generated models: the exhaustive search reads a
//! noise-free prompt back exactly at every split depth, and only because it evaluates the
//! true token; the guided search ends where the full search ends; the output-pairs attacker
//! improves with the number of pairs; both are reproducible with a seed. One ignored test
//! repeats the guided-versus-full comparison on the demo model (release build, minutes).

use tandem_testkit::tiny as common;

use std::path::Path;

use candle_core::{DType, Device};
use tandem_model::checkpoint::Checkpoint;
use tandem_model::split::{LoadOptions, EMBED};
use tandem_model::{EdgeModel, SplitPoint};
use tandem_privacy::attack::{edge_rows, AttackerView, EmbeddingIndex};
use tandem_privacy::exhaustive::{Exhaustive, PositionOutcome, StopRule};
use tandem_privacy::prompts::{self, AuditPrompt, EARLIER_REQUESTS, GENERIC_TEXT};
use tandem_privacy::{audit, AuditInputs, AuditReport, AuditSettings, ExhaustiveSettings};
use tandem_protocol::HiddenDtype;

fn tiny_model(dir: &Path, spec: usize) -> Checkpoint {
    let spec = &common::specs()[spec];
    common::write_hf(dir, spec);
    common::write_tokenizer(dir);
    Checkpoint::open(dir).expect("open tiny model")
}

fn audit_prompts(ck: &Checkpoint, n: usize) -> Vec<AuditPrompt> {
    let tok = ck.tokenizer.as_ref().expect("tokenizer");
    prompts::BUILTIN[..n]
        .iter()
        .map(|(name, text)| prompts::tokenize(tok, name, text).expect("tokenize"))
        .collect()
}

fn excluded(ck: &Checkpoint) -> Vec<u32> {
    let tok = ck.tokenizer.as_ref().expect("tokenizer");
    (0..ck.config.vocab_size as u32)
        .filter(|&t| tok.is_special(t))
        .collect()
}

fn edge(ck: &Checkpoint, k: usize) -> EdgeModel {
    let split = SplitPoint::new(k, ck.config.num_hidden_layers).expect("split");
    let lo = LoadOptions {
        dtype: DType::F32,
        device: &Device::Cpu,
    };
    EdgeModel::load(ck.tensors.as_ref(), &ck.config, split, lo).expect("edge")
}

fn index(ck: &Checkpoint, excluded: Vec<u32>) -> EmbeddingIndex {
    let cfg = &ck.config;
    let embed = ck
        .tensors
        .load(
            EMBED,
            &[cfg.vocab_size, cfg.hidden_size],
            DType::F32,
            &Device::Cpu,
        )
        .expect("embedding");
    EmbeddingIndex::new(&embed, excluded).expect("index")
}

fn search<'a>(edge: &'a EdgeModel, index: &'a EmbeddingIndex, stop: StopRule) -> Exhaustive<'a> {
    Exhaustive {
        edge,
        index,
        view: AttackerView {
            clip: None,
            wire: HiddenDtype::F32,
        },
        stop,
        budget: None,
    }
}

const EXACT: StopRule = StopRule::ExactMatch { relative: 1e-3 };

fn tokens(o: &[PositionOutcome]) -> Vec<u32> {
    o.iter().map(|p| p.token).collect()
}

#[test]
fn exhaustive_reads_a_noise_free_prompt_back_at_every_depth_as_the_full_search_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path(), 0);
    let idx = index(&ck, excluded(&ck));
    let p = &audit_prompts(&ck, 1)[0];
    let vocab = ck.config.vocab_size - idx.excluded().len();
    for k in 1..ck.config.num_hidden_layers {
        let e = edge(&ck, k);
        let rows = edge_rows(&e, &p.ids).expect("rows");
        let guided = search(&e, &idx, EXACT)
            .invert(&rows, Some(p.ids[0]), &[])
            .expect("guided");
        assert_eq!(tokens(&guided), p.ids, "k={k}: guided search");
        assert!(
            guided.iter().all(|o| o.matched),
            "k={k}: every position matched"
        );
        // The full search (every token, nearest wins) finds the same, and its runner-ups
        // are far outside the tolerance: the match is unambiguous.
        let full = search(&e, &idx, StopRule::Nearest)
            .invert(&rows, Some(p.ids[0]), &[])
            .expect("full");
        assert_eq!(tokens(&full), p.ids, "k={k}: full search");
        for o in &full[1..] {
            assert_eq!(o.candidates, vocab);
            assert!(o.relative_distance < 1e-4, "k={k}: {o:?}");
            assert!(o.runner_up > 1e-2, "k={k}: a runner-up within 1%: {o:?}");
        }
        // The guided order needs fewer candidates than the full sweep on average.
        let spent: usize = guided.iter().map(|o| o.candidates).sum();
        assert!(
            spent < vocab * (p.ids.len() - 1),
            "k={k}: {spent} candidates"
        );
    }
}

#[test]
fn exhaustive_fails_exactly_where_the_true_token_is_withheld() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path(), 2);
    let p = &audit_prompts(&ck, 2)[1];
    let e = edge(&ck, 2);
    let rows = edge_rows(&e, &p.ids).expect("rows");
    // Withhold the token at position 5 (and every other place it occurs).
    let i = 5;
    let withheld = p.ids[i];
    let first = p.ids.iter().position(|&t| t == withheld).expect("present");
    let mut ex = excluded(&ck);
    ex.push(withheld);
    let idx = index(&ck, ex);
    let vocab = ck.config.vocab_size - idx.excluded().len();
    let got = search(&e, &idx, EXACT)
        .invert(&rows, Some(p.ids[0]), &[])
        .expect("search");
    assert_eq!(tokens(&got[..first]), &p.ids[..first], "exact before it");
    let o = got[first];
    assert_ne!(o.token, withheld);
    assert!(!o.matched, "no other token may match: {o:?}");
    assert_eq!(o.candidates, vocab, "a miss sweeps the whole vocabulary");
    assert!(o.relative_distance > 1e-2, "{o:?}");
}

fn run(ck: &Checkpoint, settings: &AuditSettings, n_prompts: usize) -> AuditReport {
    let tok = ck.tokenizer.as_ref().expect("tokenizer");
    let bos = tok.bos_token().map(|b| b.id);
    let earlier: Vec<Vec<u32>> = EARLIER_REQUESTS
        .iter()
        .map(|t| {
            bos.into_iter()
                .chain(tok.encode(t, false).expect("encode"))
                .collect()
        })
        .collect();
    let generic = tok.encode(GENERIC_TEXT, false).expect("encode");
    let prompts = audit_prompts(ck, n_prompts);
    let inputs = AuditInputs {
        prompts: &prompts,
        generic: &generic[..300.min(generic.len())],
        excluded: excluded(ck),
        bos,
        earlier: &earlier,
    };
    audit(ck, &inputs, settings, &mut |_| {}).expect("audit")
}

#[test]
fn audit_reports_total_exhaustive_recovery_without_noise_at_every_depth() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path(), 0);
    let settings = AuditSettings {
        edge_layers: vec![1, 2, 3],
        noise: vec![
            "none".parse().expect("level"),
            "clip".parse().expect("level"),
        ],
        wire: vec![HiddenDtype::F32, HiddenDtype::Int8],
        gen_tokens: 2,
        random_sequences: 4,
        shortlist: 4,
        output_pairs: vec![],
        seed: 3,
        ..AuditSettings::default()
    };
    let report = run(&ck, &settings, 2);
    assert_eq!(report.cells.len(), 12);
    for c in &report.cells {
        let e = c.exhaustive.as_ref().expect("exhaustive ran");
        assert_eq!(e.stop, "exact_match");
        assert_eq!(e.recovery, 1.0, "{c:?}");
        assert_eq!(e.sensitive_recovery, 1.0, "{c:?}");
        assert_eq!(e.matched, e.positions, "{c:?}");
        assert!(e.tflops > 0.0 && e.mean_candidates >= 1.0, "{e:?}");
        // The tiny shortlist misses tokens the exhaustive search finds.
        assert!(c.nn_recovery <= e.recovery);
    }
    assert!(
        report.cells.iter().any(|c| c.nn_recovery < 1.0),
        "a shortlist of 4 should miss something"
    );
}

#[test]
fn output_pairs_attack_improves_with_more_pairs_and_is_seeded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = tiny_model(tmp.path(), 0);
    let settings = AuditSettings {
        edge_layers: vec![1],
        noise: vec![
            "none".parse().expect("level"),
            "1000".parse().expect("level"),
        ],
        gen_tokens: 2,
        random_sequences: 2,
        shortlist: 4,
        exhaustive: Some(ExhaustiveSettings {
            budget: None,
            noisy_budget: Some(64),
            match_tolerance: 1e-3,
        }),
        output_pairs: vec![16, 128, 1024],
        seed: 11,
        ..AuditSettings::default()
    };
    let a = run(&ck, &settings, 2);
    let clean = &a.cells[0].output_pairs;
    assert_eq!(clean.len(), 3);
    assert_eq!(
        clean.iter().map(|p| p.pairs).collect::<Vec<_>>(),
        vec![16, 128, 1024]
    );
    assert!(
        clean[0].distinct_tokens < clean[2].distinct_tokens,
        "{clean:?}"
    );
    let best =
        |p: &tandem_privacy::pairs::PairsRecovery| p.centroid_recovery.max(p.linear_recovery);
    assert!(
        best(&clean[2]) > best(&clean[0]) + 0.05,
        "more pairs, more recovery: {clean:?}"
    );
    assert!(best(&clean[1]) >= best(&clean[0]), "{clean:?}");
    // The noisy cell's exhaustive search is the budgeted nearest search.
    let noisy = a.cells[1].exhaustive.as_ref().expect("exhaustive");
    assert_eq!((noisy.stop.as_str(), noisy.budget), ("nearest", Some(64)));
    assert!(noisy.max_candidates <= 64);
    // Reproducible: the same seed gives the same report, another seed another one.
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
    let b = run(&ck, &settings, 2);
    assert_eq!(strip(&a), strip(&b));
    let other = run(
        &ck,
        &AuditSettings {
            seed: 12,
            ..settings.clone()
        },
        2,
    );
    assert_ne!(
        strip(&a)["cells"][0]["output_pairs"],
        strip(&other)["cells"][0]["output_pairs"],
        "the seed draws the earlier generations"
    );
}

/// The guided search against the full search on the demo model, first `TANDEM_AUDIT_POSITIONS`
/// (default 8) positions of each built-in prompt at `TANDEM_AUDIT_DEPTHS` (default 1,2,4,8).
/// Prints the candidates each needed and the margins. Minutes in a release build:
/// `cargo test --release -p tandem-serve --test audit_strong -- --ignored --nocapture`.
#[test]
#[ignore = "needs the demo model; minutes in a release build"]
fn demo_guided_search_finds_what_the_full_search_finds() {
    let Some(path) = common::demo_model() else {
        return;
    };
    let ck = Checkpoint::open(&path).expect("open demo model");
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let positions: usize = env("TANDEM_AUDIT_POSITIONS", "8")
        .parse()
        .expect("positions");
    let depths: Vec<usize> = env("TANDEM_AUDIT_DEPTHS", "1,2,4,8")
        .split(',')
        .map(|s| s.trim().parse().expect("depth"))
        .collect();
    let prompts_used: usize = env("TANDEM_AUDIT_PROMPTS", "2").parse().expect("prompts");
    let idx = index(&ck, excluded(&ck));
    for k in depths {
        let e = edge(&ck, k);
        let (mut same, mut total, mut guided_cands) = (0, 0, 0);
        let mut worst_match: f64 = 0.0;
        let mut closest_other = f64::INFINITY;
        let started = std::time::Instant::now();
        for p in audit_prompts(&ck, prompts_used) {
            let n = (positions + 1).min(p.ids.len());
            let rows = edge_rows(&e, &p.ids[..n]).expect("rows");
            let guided = search(&e, &idx, EXACT)
                .invert(&rows, Some(p.ids[0]), &[])
                .expect("guided");
            let full = search(&e, &idx, StopRule::Nearest)
                .invert(&rows, Some(p.ids[0]), &[])
                .expect("full");
            for (g, f) in guided[1..].iter().zip(&full[1..]) {
                total += 1;
                same += usize::from(g.token == f.token);
                guided_cands += g.candidates;
                worst_match = worst_match.max(f.relative_distance);
                closest_other = closest_other.min(f.runner_up);
            }
            assert_eq!(tokens(&full), p.ids[..n], "k={k}: the full search is exact");
        }
        eprintln!(
            "k={k}: guided = full at {same}/{total} positions; guided tried {:.0} candidates \
             per position (full: {}); nearest relative distance at most {worst_match:.2e}, \
             runner-up at least {closest_other:.2e}; {:.0}s",
            guided_cands as f64 / total as f64,
            ck.config.vocab_size - idx.excluded().len(),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(same, total, "k={k}");
    }
}
