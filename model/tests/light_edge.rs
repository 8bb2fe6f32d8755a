//! Light edges (`tandem split --edge-dtype bf16|int8|q4-embed`): the device's part stored in
//! bf16, in int8, or in int8 with a 4-bit embedding table loads without an f32 copy of its
//! weights, leaves the cloud part and the pair id as they were, and keeps the whole split's
//! logits close to the f32 split's.

use tandem_testkit::tiny as common;

use candle_core::{DType, Device};
use common::{max_abs_diff, run_greedy};
use tandem_model::checkpoint::{write_split_as, Checkpoint, EdgeWeights, SplitOptions};
use tandem_model::manifest::Manifest;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};

const K: usize = 2;
const STEPS: usize = 8;

fn split(ck: &Checkpoint, out: &std::path::Path, edge: EdgeWeights) -> (Manifest, Manifest) {
    let opts = SplitOptions {
        edge_layers: K,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split_as(ck, out, &opts, edge).expect("split")
}

fn load(dir: &std::path::Path) -> LocalSplit {
    LocalSplit::load(
        dir,
        &LocalSplitOptions {
            edge_layers: None,
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load split")
}

fn file_len(p: std::path::PathBuf) -> u64 {
    std::fs::metadata(&p).expect("weights file").len()
}

#[test]
fn light_edges_are_small_in_memory_and_track_the_f32_split() {
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let dir = tmp.path().join(spec.name);
        common::write_hf(&dir, &spec);
        let ck = Checkpoint::open(&dir).expect("open");
        let base_dir = tmp.path().join(format!("{}-f32", spec.name));
        let (base_edge, base_cloud) = split(&ck, &base_dir, EdgeWeights::AsSplit);
        assert_eq!(base_edge.edge_weights, None);
        let base = load(&base_dir);
        let prompt = common::prompt(&spec, 9);
        let (base_logits, base_tokens) = run_greedy(&base, &prompt, STEPS);
        let scale = base_logits[0]
            .abs()
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max |logit|")
            .max(1.0);
        let base_file = file_len(base_dir.join("edge/model.safetensors"));
        let cloud_bytes = std::fs::read(base_dir.join("cloud/model.safetensors")).expect("cloud");

        // (edge weights, embedding format, max file and memory ratios to f32, drift bound).
        // In memory bf16 pads its packed panels more than f32 does at these tiny widths; the
        // 4-bit embedding moves a tiny random model's logits much more than the demo model's
        // (see model/tests/demo_model.rs).
        let cases = [
            (EdgeWeights::Bf16, "bf16", 0.52, 0.65, 0.05),
            (EdgeWeights::Int8, "int8", 0.30, 0.30, 0.05),
            (EdgeWeights::Q4Embed, "q4", 0.30, 0.30, 0.5),
        ];
        let mut last_file = u64::MAX;
        for (edge, embedding, max_ratio, max_mem_ratio, max_drift) in cases {
            let name = edge.name().expect("a light edge has a name");
            let out = tmp.path().join(format!("{}-{name}", spec.name));
            let (m_edge, m_cloud) = split(&ck, &out, edge);
            assert_eq!(m_edge.edge_weights.as_deref(), Some(name));
            // The cloud cannot tell: same pair id, same manifest dtype, same cloud bytes.
            assert_eq!(m_edge.pair_id, base_edge.pair_id, "{name}: pair id");
            assert_eq!(m_cloud, base_cloud, "{name}: cloud manifest");
            assert_eq!(m_edge.dtype, "f32");
            let cloud = std::fs::read(out.join("cloud/model.safetensors")).expect("cloud");
            assert!(cloud == cloud_bytes, "{name}: the cloud part changed");

            let file = file_len(out.join("edge/model.safetensors"));
            assert!(
                (file as f64) < max_ratio * base_file as f64,
                "{name}: edge file {file} B vs f32 {base_file} B"
            );
            assert!(
                file < last_file,
                "{name} is not lighter than the previous format"
            );
            last_file = file;

            let light = load(&out);
            assert_eq!(light.edge.embedding_format(), embedding, "{name}");
            assert_eq!(
                light.cloud.weight_dtype(),
                DType::F32,
                "{name}: cloud dtype"
            );
            assert_eq!(
                light.edge.dtype(),
                DType::F32,
                "{name}: hidden states stay f32"
            );
            let (mem, base_mem) = (light.edge.weight_bytes(), base.edge.weight_bytes());
            assert!(
                (mem as f64) < max_mem_ratio * base_mem as f64,
                "{name}: {mem} B in memory vs f32 {base_mem} B"
            );

            let (logits, tokens) = run_greedy(&light, &prompt, STEPS);
            let drift = max_abs_diff(&logits[0], &base_logits[0]);
            let agree = tokens
                .iter()
                .zip(&base_tokens)
                .filter(|(a, b)| a == b)
                .count();
            println!(
                "{} {name}: file {:.3}x, memory {:.3}x, prompt logit drift {drift:.3e} \
                 (max |logit| {scale:.2}), greedy {agree}/{STEPS}",
                spec.name,
                file as f64 / base_file as f64,
                mem as f64 / base_mem as f64,
            );
            assert!(
                drift > 0.0,
                "{name}: identical to f32, so nothing was quantized"
            );
            assert!(
                drift < max_drift * scale,
                "{name}: logits drifted {drift} (max |logit| {scale})"
            );
        }
    }
}

#[test]
fn edge_dtype_names_parse_and_unknown_ones_are_refused() {
    for (text, want) in [
        ("bf16", EdgeWeights::Bf16),
        ("INT8", EdgeWeights::Int8),
        ("q4-embed", EdgeWeights::Q4Embed),
    ] {
        assert_eq!(text.parse::<EdgeWeights>(), Ok(want));
    }
    let err = "int4".parse::<EdgeWeights>().expect_err("int4");
    assert!(err.contains("bf16, int8 or q4-embed"), "{err}");
}

#[test]
fn a_light_edge_with_a_missing_scale_is_refused_with_the_tensor_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let dir = tmp.path().join("m");
    common::write_hf(&dir, spec);
    let ck = Checkpoint::open(&dir).expect("open");
    let out = tmp.path().join("split");
    split(&ck, &out, EdgeWeights::Int8);
    // Rewrite the edge's weights without one scale tensor (same manifest byte count would
    // fail first, so keep the size check honest: the manifest is rewritten as well).
    let path = out.join("edge/model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let victim = "model.layers.0.mlp.down_proj.weight.scale";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != victim)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "the scale tensor exists");
    safetensors::serialize_to_file(kept, None, &path).expect("write");
    let mut m = Manifest::read(&out.join("edge")).expect("manifest");
    m.weights.bytes = std::fs::metadata(&path).expect("len").len();
    m.weights.tensors -= 1;
    m.write(&out.join("edge")).expect("write manifest");

    let err = LocalSplit::load(
        &out,
        &LocalSplitOptions {
            edge_layers: None,
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect_err("a missing scale must not load");
    let text = err.to_string();
    assert!(
        text.contains("model.layers.0.mlp.down_proj.weight") && text.contains("scale"),
        "{text}"
    );
}
