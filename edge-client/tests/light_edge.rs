//! A light edge on the device (`tandem split --edge-dtype`): `tandem-edge info` (the real
//! binary) reports what it holds in memory, a fraction of the f32 edge's, and the device's rows
//! are the ones the same light split computes in one process.

use tandem_testkit::tiny as common;

use std::process::Command;

use candle_core::{DType, Device};
use tandem_edge::EdgeBundle;
use tandem_model::checkpoint::{write_split_as, Checkpoint, EdgeWeights, SplitOptions};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};

fn info(edge: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-edge"))
        .args(["info", "--edge"])
        .arg(edge)
        .output()
        .expect("run tandem-edge info");
    assert!(
        out.status.success(),
        "tandem-edge info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("info prints JSON")
}

fn rows(model: &tandem_model::EdgeModel, tokens: &[u32]) -> Vec<u32> {
    let mut kv = ContiguousKv::new(model.config().num_hidden_layers, 512);
    let h = model
        .forward(tokens, &ForwardCtx::single(0, tokens.len()), &mut kv)
        .expect("edge forward");
    let v: Vec<f32> = h.flatten_all().expect("flat").to_vec1().expect("rows");
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn info_reports_a_light_edge_and_the_device_computes_what_the_split_computes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = &common::specs()[0];
    let hf = tmp.path().join("hf");
    common::write_hf(&hf, spec);
    let ck = Checkpoint::open(&hf).expect("open");
    let opts = SplitOptions {
        edge_layers: 2,
        dtype: DType::F32,
        force: false,
        progress: false,
    };
    let mut reports = Vec::new();
    for edge in [
        EdgeWeights::AsSplit,
        EdgeWeights::Int8,
        EdgeWeights::Q4Embed,
    ] {
        let name = edge.name().unwrap_or("f32");
        let dir = tmp.path().join(name);
        write_split_as(&ck, &dir, &opts, edge).expect("split");
        let report = info(&dir);
        assert_eq!(report["edge_layers"], 2);
        assert_eq!(report["stored"], name, "{report}");
        assert!(
            report["weights_file_bytes"].as_u64().unwrap_or(0) > 0,
            "{report}"
        );
        if cfg!(target_os = "linux") {
            assert!(report["rss_kib"].as_u64().unwrap_or(0) > 0, "{report}");
        }

        let device = EdgeBundle::load(&dir).expect("edge bundle");
        let split = LocalSplit::load(
            &dir,
            &LocalSplitOptions {
                edge_layers: None,
                dtype: None,
                device: Device::Cpu,
            },
        )
        .expect("split in one process");
        let tokens = common::prompt(spec, 7);
        assert_eq!(
            rows(&device.model, &tokens),
            rows(&split.edge, &tokens),
            "{name}"
        );
        reports.push(report);
    }
    let mem = |r: &serde_json::Value| r["weights_in_memory_bytes"].as_u64().unwrap_or(0) as f64;
    assert_eq!(reports[0]["embedding"], "f32");
    assert_eq!(reports[1]["embedding"], "int8");
    assert_eq!(reports[2]["embedding"], "q4");
    assert!(
        mem(&reports[1]) < 0.3 * mem(&reports[0]),
        "int8 {} vs f32 {}",
        reports[1],
        reports[0]
    );
    assert!(
        mem(&reports[2]) < mem(&reports[1]),
        "q4-embed is lighter than int8"
    );
}
