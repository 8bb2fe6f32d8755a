//! `tandem-edge --compute-dtype`: the edge part loaded in another dtype than stored. bf16
//! runs on the model's bf16 kernels and still hands f32 hidden states to the wire; its rows
//! equal those of the same model loaded in bf16 in one process (`LocalSplit`), bit for bit,
//! and stay close to the f32 rows.

use tandem_testkit::tiny as common;

use candle_core::{DType, Device};
use tandem_edge::EdgeBundle;
use tandem_model::checkpoint::{write_split, Checkpoint, SplitOptions};
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};

fn rows(model: &tandem_model::EdgeModel, tokens: &[u32]) -> Vec<f32> {
    let n = model.config().num_hidden_layers;
    let mut kv = ContiguousKv::new(n, 512);
    let h = model
        .forward(tokens, &ForwardCtx::single(0, tokens.len()), &mut kv)
        .expect("edge forward");
    assert_eq!(
        h.dtype(),
        DType::F32,
        "hidden states stay f32 on the wire's side"
    );
    h.flatten_all().expect("flat").to_vec1().expect("rows")
}

#[test]
fn a_bf16_edge_computes_what_the_bf16_model_computes() {
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
    let split = tmp.path().join("split");
    write_split(&ck, &split, &opts).expect("split");
    let tokens = common::prompt(spec, 9);

    let stored = EdgeBundle::load(&split).expect("f32 edge");
    let bf16 = EdgeBundle::load_as(&split, Some(DType::BF16)).expect("bf16 edge");
    let whole = LocalSplit::load(
        &hf,
        &LocalSplitOptions {
            edge_layers: Some(2),
            dtype: Some(DType::BF16),
            device: Device::Cpu,
        },
    )
    .expect("bf16 split in one process");

    let (f32_rows, bf16_rows) = (rows(&stored.model, &tokens), rows(&bf16.model, &tokens));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&bf16_rows), bits(&rows(&whole.edge, &tokens)));
    assert_ne!(
        bits(&bf16_rows),
        bits(&f32_rows),
        "bf16 must really be used"
    );
    let scale = f32_rows.iter().fold(0f32, |m, v| m.max(v.abs()));
    let drift = f32_rows
        .iter()
        .zip(&bf16_rows)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        drift < 0.05 * scale,
        "bf16 rows drift {drift} (max |row| {scale})"
    );
    assert_eq!(
        bf16.pair_id(),
        stored.pair_id(),
        "the pair is the same model"
    );
}
