//! The split is exact: for every split point, edge + cloud give the logits of
//! candle-transformers' reference Llama on the same weights (f32, within 1e-4), and the same
//! greedy tokens over 32 steps. Also: a split written to disk by `write_split` and loaded back
//! gives bit-identical logits to the in-memory split.

use tandem_testkit::tiny as common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use common::{max_abs_diff, TinySpec};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::sampling::argmax;

const TOL: f32 = 1e-4;
const STEPS: usize = 32;

struct Reference {
    model: reference::Llama,
    cache: reference::Cache,
}

impl Reference {
    fn load(dir: &std::path::Path, s: &TinySpec, files: &[std::path::PathBuf]) -> Reference {
        let text = serde_json::to_string(&common::config_json(s)).expect("json");
        let cfg: reference::LlamaConfig = serde_json::from_str(&text).expect("reference config");
        let cfg = cfg.into_config(false);
        let vb = reference_vars(files);
        let model = reference::Llama::load(vb, &cfg).expect("reference load");
        let cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).expect("cache");
        let _ = dir;
        Reference { model, cache }
    }

    fn step(&mut self, tokens: &[u32], pos: usize) -> Tensor {
        let input = Tensor::new(tokens, &Device::Cpu)
            .expect("t")
            .unsqueeze(0)
            .expect("u");
        self.model
            .forward(&input, pos, &mut self.cache)
            .expect("reference forward")
            .squeeze(0)
            .expect("squeeze")
    }
}

struct Split<'a> {
    m: &'a LocalSplit,
    edge_kv: ContiguousKv,
    cloud_kv: ContiguousKv,
}

impl<'a> Split<'a> {
    fn new(m: &'a LocalSplit) -> Self {
        let n = m.edge.config().num_hidden_layers;
        Split {
            m,
            edge_kv: ContiguousKv::new(n, 512),
            cloud_kv: ContiguousKv::new(n, 512),
        }
    }

    fn step(&mut self, tokens: &[u32], pos: usize) -> Tensor {
        let ctx = ForwardCtx::single(pos, tokens.len());
        let hidden = self
            .m
            .edge
            .forward(tokens, &ctx, &mut self.edge_kv)
            .expect("edge");
        assert_eq!(
            hidden.dims(),
            &[tokens.len(), self.m.edge.config().hidden_size]
        );
        self.m
            .cloud
            .forward(&hidden, &ctx, &mut self.cloud_kv)
            .expect("cloud")
            .squeeze(0)
            .expect("squeeze")
    }
}

fn load_split(path: &std::path::Path, k: Option<usize>) -> LocalSplit {
    LocalSplit::load(
        path,
        &LocalSplitOptions {
            edge_layers: k,
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load split")
}

/// Runs prefill + STEPS greedy decode steps on both; returns the max logit difference.
fn compare(
    spec: &TinySpec,
    dir: &std::path::Path,
    files: &[std::path::PathBuf],
    split: &LocalSplit,
) -> f32 {
    let mut r = Reference::load(dir, spec, files);
    let mut s = Split::new(split);
    let prompt = common::prompt(spec, 7);
    let (mut lr, mut ls) = (r.step(&prompt, 0), s.step(&prompt, 0));
    let mut worst = 0f32;
    for (step, pos) in (prompt.len()..prompt.len() + STEPS).enumerate() {
        let d = max_abs_diff(&lr, &ls);
        worst = worst.max(d);
        assert!(
            d <= TOL,
            "{} k={}: step {step}: logits differ by {d}",
            spec.name,
            split.edge.split().edge_layers()
        );
        let tr = argmax(&lr.to_vec1::<f32>().expect("v"));
        let ts = argmax(&ls.to_vec1::<f32>().expect("v"));
        assert_eq!(
            tr,
            ts,
            "{} k={}: greedy token differs at step {step}",
            spec.name,
            split.edge.split().edge_layers()
        );
        lr = r.step(&[tr], pos);
        ls = s.step(&[ts], pos);
    }
    worst
}

#[test]
fn split_equals_whole_for_every_shape_and_split_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let dir = tmp.path().join(spec.name);
        let files = common::write_hf(&dir, &spec);
        let n = spec.layers;
        let mut ks = vec![1, 2, n - 1];
        ks.dedup();
        for k in ks {
            let split = load_split(&dir, Some(k));
            let worst = compare(&spec, &dir, &files, &split);
            println!(
                "{}: k={k}/{n}: max |logit diff| over prefill + {STEPS} steps = {worst:.3e}",
                spec.name
            );
        }
    }
}

#[test]
fn greedy_tokens_are_not_trivially_constant() {
    // Guards the test above: a model whose greedy output never changes would make token
    // equality meaningless.
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let dir = tmp.path().join(spec.name);
        common::write_hf(&dir, &spec);
        let split = load_split(&dir, Some(1));
        let mut s = Split::new(&split);
        let prompt = common::prompt(&spec, 7);
        let mut logits = s.step(&prompt, 0);
        let mut seen = std::collections::HashSet::new();
        for pos in prompt.len()..prompt.len() + STEPS {
            let t = argmax(&logits.to_vec1::<f32>().expect("v"));
            seen.insert(t);
            logits = s.step(&[t], pos);
        }
        println!(
            "{}: {} distinct greedy tokens in {STEPS}",
            spec.name,
            seen.len()
        );
        assert!(
            seen.len() > 3,
            "{}: greedy output is nearly constant: {seen:?}",
            spec.name
        );
    }
}

#[test]
fn split_written_to_disk_equals_in_memory_split() {
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let dir = tmp.path().join(spec.name);
        common::write_hf(&dir, &spec);
        let k = 2;
        let out = tmp.path().join(format!("{}-split", spec.name));
        let ck = Checkpoint::open(&dir).expect("open");
        let opts = SplitOptions {
            edge_layers: k,
            dtype: DType::F32,
            force: false,
            progress: false,
        };
        let (edge, cloud) = write_split(&ck, &out, &opts).expect("split");
        assert_eq!(edge.pair_id, cloud.pair_id);
        assert_eq!(edge.layers, [0, k]);
        assert_eq!(cloud.layers, [k, spec.layers]);
        // The edge part holds the embedding and layers [0,k) only; the cloud the rest.
        let e = Checkpoint::open_part(&out.join("edge"), tandem_model::manifest::Part::Edge)
            .expect("edge part");
        let c = Checkpoint::open_part(&out.join("cloud"), tandem_model::manifest::Part::Cloud)
            .expect("cloud part");
        assert!(e.tensors.contains("model.embed_tokens.weight"));
        assert!(e
            .tensors
            .contains(&format!("model.layers.{}.mlp.up_proj.weight", k - 1)));
        assert!(!e
            .tensors
            .contains(&format!("model.layers.{k}.mlp.up_proj.weight")));
        assert!(!e.tensors.contains("lm_head.weight") && !e.tensors.contains("model.norm.weight"));
        assert!(c
            .tensors
            .contains(&format!("model.layers.{k}.mlp.up_proj.weight")));
        assert!(!c
            .tensors
            .contains(&format!("model.layers.{}.mlp.up_proj.weight", k - 1)));
        assert!(!c.tensors.contains("model.embed_tokens.weight"));
        assert!(c.tensors.contains("lm_head.weight") && c.tensors.contains("model.norm.weight"));

        let mem = load_split(&dir, Some(k));
        let disk = load_split(&out, None);
        let prompt = common::prompt(&spec, 9);
        let (mut a, mut b) = (Split::new(&mem), Split::new(&disk));
        let (la, lb) = (a.step(&prompt, 0), b.step(&prompt, 0));
        assert_eq!(
            max_abs_diff(&la, &lb),
            0.0,
            "{}: disk split differs",
            spec.name
        );
        // A split directory refuses a different depth than it was cut at.
        let err = LocalSplit::load(
            &out,
            &LocalSplitOptions {
                edge_layers: Some(1),
                dtype: None,
                device: Device::Cpu,
            },
        )
        .expect_err("wrong depth");
        assert!(err.to_string().contains("split at 2"), "{err}");
    }
}

#[test]
fn bf16_split_tracks_f32_closely() {
    let spec = &common::specs()[0];
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_hf(tmp.path(), spec);
    let f32_split = load_split(tmp.path(), Some(1));
    let bf16 = LocalSplit::load(
        tmp.path(),
        &LocalSplitOptions {
            edge_layers: Some(1),
            dtype: Some(DType::BF16),
            device: Device::Cpu,
        },
    )
    .expect("bf16");
    // bf16 weights on the CPU: the hidden states stay f32 (the matmuls round their inputs).
    assert_eq!(bf16.edge.dtype(), DType::F32);
    assert_eq!(bf16.cloud.weight_dtype(), DType::BF16);
    let prompt = common::prompt(spec, 7);
    let la = Split::new(&f32_split).step(&prompt, 0);
    let lb = Split::new(&bf16).step(&prompt, 0);
    let d = max_abs_diff(&la, &lb);
    let scale = la
        .abs()
        .expect("abs")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("s");
    println!("bf16 vs f32: max |logit diff| {d:.3e} (max |logit| {scale:.2})");
    assert!(d > 0.0, "bf16 should not be bit-identical to f32");
    assert!(d < 0.1 * scale.max(1.0), "bf16 drifted too far: {d}");
}

fn load_bf16(path: &std::path::Path, k: usize) -> LocalSplit {
    LocalSplit::load(
        path,
        &LocalSplitOptions {
            edge_layers: Some(k),
            dtype: Some(DType::BF16),
            device: Device::Cpu,
        },
    )
    .expect("bf16 split")
}

/// In bf16 the edge and the cloud run the same kernels and hand over f32 hidden states
/// unchanged, so where the model is cut cannot change a bit: every split point gives the
/// logits of every other, bit for bit, over a prompt and 32 greedy steps.
#[test]
fn bf16_split_is_the_same_model_at_every_split_point() {
    let tmp = tempfile::tempdir().expect("tmp");
    for spec in common::specs() {
        let dir = tmp.path().join(spec.name);
        common::write_hf(&dir, &spec);
        let n = spec.layers;
        let whole_ish = load_bf16(&dir, n - 1);
        for k in 1..n - 1 {
            let split = load_bf16(&dir, k);
            let (mut a, mut b) = (Split::new(&whole_ish), Split::new(&split));
            let prompt = common::prompt(&spec, 7);
            let (mut la, mut lb) = (a.step(&prompt, 0), b.step(&prompt, 0));
            for pos in prompt.len()..prompt.len() + STEPS {
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_vec1::<f32>()
                        .expect("v")
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(bits(&la), bits(&lb), "{} k={k}: position {pos}", spec.name);
                let t = argmax(&la.to_vec1::<f32>().expect("v"));
                la = a.step(&[t], pos);
                lb = b.step(&[t], pos);
            }
        }
    }
}

/// The reference's weights: the union of the tensors of `files`, read into memory (safe, unlike
/// mapping them; the files are small).
fn reference_vars(files: &[std::path::PathBuf]) -> VarBuilder<'static> {
    let mut tensors = std::collections::HashMap::new();
    for file in files {
        tensors
            .extend(candle_core::safetensors::load(file, &Device::Cpu).expect("read safetensors"));
    }
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}
