//! The GGUF path equals the HF path: a tiny model written as GGUF (llama.cpp layout: GGUF
//! names, Q/K rows permuted for interleaved rotary, Llama 3 scaling as `rope_freqs`) loads to
//! the same configuration and gives the same logits as the safetensors original — in f32 and
//! with Q8_0-quantized matrices.

use tandem_testkit::tiny as common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, TinySpec};
use tandem_model::checkpoint::Checkpoint;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::weights::{gguf_name, permute_qk_for_gguf};

/// Writes `tensors` (HF names) as a llama GGUF file; 2-D matrices use `matrix_dtype`.
fn write_gguf(path: &Path, s: &TinySpec, tensors: &[(String, Tensor)], matrix_dtype: GgmlDType) {
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in tensors {
        let mut t = t.clone();
        if name.ends_with("q_proj.weight") {
            t = permute_qk_for_gguf(&t, s.heads).expect("permute q");
        } else if name.ends_with("k_proj.weight") {
            t = permute_qk_for_gguf(&t, s.kv_heads).expect("permute k");
        }
        let dtype = if t.rank() == 2 {
            matrix_dtype
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        qtensors.push((gguf_name(name).expect("gguf name"), q));
    }
    if s.llama3_rope {
        // llama.cpp stores Llama 3 scaling as per-frequency divisors.
        let mut cfg_plain = tandem_model::LlamaConfig::from_hf_json(
            &common::config_json(s).to_string(),
            Path::new("config.json"),
        )
        .expect("config");
        let scaled = cfg_plain.rope_inv_freq();
        cfg_plain.rope_scaling = None;
        let base = cfg_plain.rope_inv_freq();
        let factors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu).expect("t");
        qtensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).expect("q"),
        ));
    }
    use gguf_file::Value as V;
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("general.name", V::String(s.name.into())),
        ("llama.embedding_length", V::U32(s.hidden as u32)),
        ("llama.feed_forward_length", V::U32(s.intermediate as u32)),
        ("llama.block_count", V::U32(s.layers as u32)),
        ("llama.attention.head_count", V::U32(s.heads as u32)),
        ("llama.attention.head_count_kv", V::U32(s.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        (
            "llama.rope.freq_base",
            V::F32(if s.llama3_rope { 500000.0 } else { 10000.0 }),
        ),
        ("llama.context_length", V::U32(512)),
        ("llama.vocab_size", V::U32(s.vocab as u32)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.eot_token_id", V::U32(3)),
    ];
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
}

fn run_greedy_logits(m: &LocalSplit, prompt: &[u32], steps: usize) -> Vec<Tensor> {
    common::run_greedy(m, prompt, steps).0
}

fn load(path: &Path, k: usize) -> LocalSplit {
    LocalSplit::load(
        path,
        &LocalSplitOptions {
            edge_layers: Some(k),
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load")
}

#[test]
fn gguf_f32_equals_hf_for_every_shape() {
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let hf = tmp.path().join(spec.name);
        common::write_hf(&hf, &spec);
        let gguf = tmp.path().join(format!("{}.gguf", spec.name));
        write_gguf(&gguf, &spec, &common::tensors(&spec), GgmlDType::F32);

        let a = Checkpoint::open(&hf).expect("hf");
        let b = Checkpoint::open(&gguf).expect("gguf");
        let mut expect = a.config.clone();
        expect.eos_token_ids = vec![2, 3];
        assert_eq!(b.config.rope_scaling.is_some(), spec.llama3_rope);
        let (mut ca, mut cb) = (a.config.clone(), b.config.clone());
        ca.rope_scaling = None;
        cb.rope_scaling = None;
        assert_eq!(ca, cb, "{}: GGUF metadata gives another config", spec.name);
        for (x, y) in a
            .config
            .rope_inv_freq()
            .iter()
            .zip(b.config.rope_inv_freq())
        {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs(),
                "rope frequencies differ: {x} vs {y}"
            );
        }

        let prompt = common::prompt(&spec, 6);
        let la = run_greedy_logits(&load(&hf, 1), &prompt, 8);
        let lb = run_greedy_logits(&load(&gguf, 1), &prompt, 8);
        let worst = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0f32, f32::max);
        println!(
            "{}: GGUF(f32) vs HF max |logit diff| = {worst:.3e}",
            spec.name
        );
        assert!(
            worst <= 1e-5,
            "{}: GGUF path differs from HF path by {worst}",
            spec.name
        );
    }
}

#[test]
fn gguf_without_qk_unpermute_would_differ() {
    // Guards the test above: if the loader did not undo llama.cpp's permutation, the logits
    // would move. Write a GGUF whose Q/K are *not* permuted and check it disagrees.
    let spec = common::specs()[0].clone();
    let tmp = tempfile::tempdir().expect("tmp");
    let hf = tmp.path().join("hf");
    common::write_hf(&hf, &spec);
    let unpermuted: Vec<(String, Tensor)> = common::tensors(&spec)
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with("q_proj.weight") {
                // pre-apply the inverse so that write_gguf's permutation cancels out
                let t = tandem_model::weights::unpermute_qk_from_gguf(&t, spec.heads).expect("u");
                (n, t)
            } else if n.ends_with("k_proj.weight") {
                let t =
                    tandem_model::weights::unpermute_qk_from_gguf(&t, spec.kv_heads).expect("u");
                (n, t)
            } else {
                (n, t)
            }
        })
        .collect();
    let gguf = tmp.path().join("bad.gguf");
    write_gguf(&gguf, &spec, &unpermuted, GgmlDType::F32);
    let prompt = common::prompt(&spec, 6);
    let la = run_greedy_logits(&load(&hf, 1), &prompt, 1);
    let lb = run_greedy_logits(&load(&gguf, 1), &prompt, 1);
    assert!(max_abs_diff(&la[0], &lb[0]) > 1e-2);
}

#[test]
fn gguf_q8_0_equals_hf_of_the_dequantized_weights() {
    let spec = common::specs()[0].clone(); // every in-dimension is a multiple of 32
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("q8.gguf");
    let tensors = common::tensors(&spec);
    write_gguf(&gguf, &spec, &tensors, GgmlDType::Q8_0);
    // The HF twin holds what Q8_0 keeps of each matrix, quantized in llama.cpp's row order.
    let hf = tmp.path().join("hf");
    std::fs::create_dir_all(&hf).expect("mkdir");
    std::fs::write(
        hf.join("config.json"),
        common::config_json(&spec).to_string(),
    )
    .expect("cfg");
    let mut twin = HashMap::new();
    for (name, t) in &tensors {
        let t = if t.rank() == 2 {
            let heads = if name.ends_with("q_proj.weight") {
                Some(spec.heads)
            } else if name.ends_with("k_proj.weight") {
                Some(spec.kv_heads)
            } else {
                None
            };
            let p = match heads {
                Some(h) => permute_qk_for_gguf(t, h).expect("p"),
                None => t.clone(),
            };
            let dq = QTensor::quantize(&p, GgmlDType::Q8_0)
                .expect("q")
                .dequantize(&Device::Cpu)
                .expect("dq");
            match heads {
                Some(h) => tandem_model::weights::unpermute_qk_from_gguf(&dq, h).expect("u"),
                None => dq,
            }
        } else {
            t.clone()
        };
        twin.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&twin, hf.join("model.safetensors")).expect("save");
    let prompt = common::prompt(&spec, 6);
    for k in [1, 3] {
        let la = run_greedy_logits(&load(&hf, k), &prompt, 6);
        let lb = run_greedy_logits(&load(&gguf, k), &prompt, 6);
        let worst = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "k={k}: Q8_0 GGUF differs from its HF twin by {worst}"
        );
    }
    let _ = DType::F32;
}
