//! Bad checkpoints give clear errors that name the file and the tensor: mismatched split parts,
//! truncated and corrupt files, a missing tensor, a wrong shape, an unsupported architecture.

use tandem_testkit::tiny as common;

use std::path::Path;

use candle_core::{DType, Device};
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::manifest::{check_pair, Manifest, Part};
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};
use tandem_model::ModelError;

fn opts(k: Option<usize>) -> LocalSplitOptions {
    LocalSplitOptions {
        edge_layers: k,
        dtype: None,
        device: Device::Cpu,
    }
}

fn split_to(model: &Path, out: &Path, k: usize) {
    let ck = Checkpoint::open(model).expect("open");
    let o = SplitOptions {
        edge_layers: k,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    write_split(&ck, out, &o).expect("split");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn mismatched_parts_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let specs = common::specs();
    let (a, b) = (&specs[0], &specs[2]);
    let (ma, mb) = (tmp.path().join("a"), tmp.path().join("b"));
    common::write_hf(&ma, a);
    common::write_hf(&mb, b);
    // Same model, two split points: the k=1 edge with the k=2 cloud.
    split_to(&ma, &tmp.path().join("a1"), 1);
    split_to(&ma, &tmp.path().join("a2"), 2);
    split_to(&mb, &tmp.path().join("b1"), 1);
    let mixed = tmp.path().join("mixed-depth");
    copy_dir(&tmp.path().join("a1/edge"), &mixed.join("edge"));
    copy_dir(&tmp.path().join("a2/cloud"), &mixed.join("cloud"));
    let err = LocalSplit::load(&mixed, &opts(None)).expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("do not belong together") && msg.contains("edge_layers"),
        "{msg}"
    );

    // Two different models split at the same depth.
    let mixed = tmp.path().join("mixed-model");
    copy_dir(&tmp.path().join("a1/edge"), &mixed.join("edge"));
    copy_dir(&tmp.path().join("b1/cloud"), &mixed.join("cloud"));
    let err = LocalSplit::load(&mixed, &opts(None)).expect_err("must refuse");
    assert!(err.to_string().contains("do not belong together"), "{err}");

    // Two edges.
    let e = Manifest::read(&tmp.path().join("a1/edge")).expect("manifest");
    assert!(check_pair(&e, &e).is_err());
    let c = Manifest::read(&tmp.path().join("a1/cloud")).expect("manifest");
    check_pair(&e, &c).expect("the real pair matches");
}

#[test]
fn hand_edited_or_swapped_manifests_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let m = tmp.path().join("m");
    common::write_hf(&m, spec);
    let out = tmp.path().join("s");
    split_to(&m, &out, 2);
    // Editing a shared field without recomputing the pair id is caught.
    let path = out.join("cloud/manifest.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        text.replace("\"edge_layers\": 2", "\"edge_layers\": 1"),
    )
    .expect("write");
    let err = LocalSplit::load(&out, &opts(None)).expect_err("edited");
    assert!(err.to_string().contains("pair_id"), "{err}");
    std::fs::write(&path, &text).expect("restore");
    // An edge directory opened as the cloud part.
    let err = Checkpoint::open_part(&out.join("edge"), Part::Cloud).expect_err("wrong part");
    assert!(
        err.to_string()
            .contains("edge part, expected the cloud part"),
        "{err}"
    );
    // A part passed where a whole model is expected.
    let err = Checkpoint::open(&out.join("edge")).expect_err("part as whole");
    assert!(err.to_string().contains("one part of a split"), "{err}");
}

#[test]
fn truncated_and_corrupt_weights_name_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let m = tmp.path().join("m");
    let files = common::write_hf(&m, spec);
    let file = &files[0];
    let bytes = std::fs::read(file).expect("read");

    std::fs::write(file, &bytes[..bytes.len() - 100]).expect("truncate");
    let err = Checkpoint::open(&m).expect_err("truncated");
    assert!(matches!(err, ModelError::Format { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"garbage!");
    std::fs::write(file, &corrupt).expect("corrupt");
    let err = Checkpoint::open(&m).expect_err("corrupt header");
    assert!(
        err.to_string().contains("model.safetensors")
            && err.to_string().contains("not a valid safetensors"),
        "{err}"
    );

    std::fs::write(file, &bytes[..4]).expect("tiny");
    assert!(Checkpoint::open(&m).is_err());

    // A split part whose weights were truncated after the split: the manifest size check.
    std::fs::write(file, &bytes).expect("restore");
    let out = tmp.path().join("s");
    split_to(&m, &out, 1);
    let w = out.join("cloud/model.safetensors");
    let wb = std::fs::read(&w).expect("read");
    std::fs::write(&w, &wb[..wb.len() / 2]).expect("truncate");
    let err = LocalSplit::load(&out, &opts(None)).expect_err("truncated part");
    assert!(err.to_string().contains("cloud"), "{err}");
}

#[test]
fn missing_tensor_and_wrong_shape_name_the_tensor() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let m = tmp.path().join("m");
    common::write_hf(&m, spec);
    let file = m.join("model.safetensors");
    let mut all = candle_core::safetensors::load(&file, &Device::Cpu).expect("load");

    let missing = "model.layers.2.mlp.down_proj.weight";
    let saved = all.remove(missing).expect("present");
    candle_core::safetensors::save(&all, &file).expect("save");
    // Loading the edge only (k = 1) does not need layer 2; loading the cloud does.
    let err = LocalSplit::load(&m, &opts(Some(1))).expect_err("missing");
    assert!(
        matches!(&err, ModelError::MissingTensor { tensor, .. } if tensor == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains(missing), "{err}");

    let bad = saved.narrow(0, 0, 10).expect("narrow");
    all.insert(missing.to_string(), bad);
    candle_core::safetensors::save(&all, &file).expect("save");
    let err = LocalSplit::load(&m, &opts(Some(1))).expect_err("shape");
    match &err {
        ModelError::TensorShape {
            tensor,
            expected,
            actual,
            path,
        } => {
            assert_eq!(tensor, missing);
            assert_eq!(expected, &vec![spec.hidden, spec.intermediate]);
            assert_eq!(actual, &vec![10, spec.intermediate]);
            assert!(path.ends_with("model.safetensors"));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // An integer tensor where floats belong.
    let ints =
        candle_core::Tensor::zeros((spec.hidden, spec.intermediate), DType::U32, &Device::Cpu)
            .expect("z");
    all.insert(missing.to_string(), ints);
    candle_core::safetensors::save(&all, &file).expect("save");
    let err = LocalSplit::load(&m, &opts(Some(1))).expect_err("dtype");
    assert!(matches!(err, ModelError::TensorDtype { .. }), "{err:?}");
}

#[test]
fn unsupported_architectures_and_bad_configs_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let m = tmp.path().join("m");
    common::write_hf(&m, spec);
    let mut cfg = common::config_json(spec);
    cfg["model_type"] = "gpt_neox".into();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(m.join("config.json"), cfg.to_string()).expect("write");
    let err = Checkpoint::open(&m).expect_err("arch");
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture { arch, .. } if arch == "gpt_neox"),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");

    // A GGUF of another architecture.
    use candle_core::quantized::gguf_file;
    let g = tmp.path().join("other.gguf");
    let arch = gguf_file::Value::String("gpt2".into());
    let mut f = std::fs::File::create(&g).expect("create");
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).expect("write");
    drop(f);
    let err = Checkpoint::open(&g).expect_err("gguf arch");
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture { arch, .. } if arch == "gpt2"),
        "{err:?}"
    );

    // Not a GGUF at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not gguf").expect("write");
    let err = Checkpoint::open(&junk).expect_err("junk");
    assert!(err.to_string().contains("junk.gguf"), "{err}");

    // A split point out of range.
    std::fs::write(m.join("config.json"), common::config_json(spec).to_string()).expect("restore");
    let err = LocalSplit::load(&m, &opts(Some(0))).expect_err("k=0");
    assert!(err.to_string().contains("between 1 and"), "{err}");
}

#[test]
fn split_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[1];
    let m = tmp.path().join("m");
    common::write_hf(&m, spec);
    let out = tmp.path().join("s");
    split_to(&m, &out, 1);
    let ck = Checkpoint::open(&m).expect("open");
    let mut o = SplitOptions {
        edge_layers: 2,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    let err = write_split(&ck, &out, &o).expect_err("exists");
    assert!(err.to_string().contains("--force"), "{err}");
    o.force = true;
    let (e, _) = write_split(&ck, &out, &o).expect("forced");
    assert_eq!(e.edge_layers, 2);
    assert_eq!(Manifest::read(&out.join("edge")).expect("m").edge_layers, 2);
    assert!(!out.join(".edge.partial").exists());
}
