//! `EdgeSession`: feeding a prompt then tokens one by one gives the hidden states of running
//! the whole sequence at once, and bad input consumes nothing.

use tandem_testkit::tiny as common;

use std::sync::Arc;

use candle_core::Device;
use tandem_edge::EdgeSession;
use tandem_model::kv::ContiguousKv;
use tandem_model::layers::ForwardCtx;
use tandem_model::pipeline::{LocalSplit, LocalSplitOptions};

#[test]
fn incremental_feeding_equals_one_pass() {
    let spec = &common::specs()[0];
    let tmp = tempfile::tempdir().expect("tmp");
    common::write_hf(tmp.path(), spec);
    let m = LocalSplit::load(
        tmp.path(),
        &LocalSplitOptions {
            edge_layers: Some(2),
            dtype: None,
            device: Device::Cpu,
        },
    )
    .expect("load");
    let tokens = common::prompt(spec, 10);
    let edge = Arc::new(m.edge);
    let mut s = EdgeSession::new(edge.clone());
    let mut rows = vec![s.feed(&tokens[..7]).expect("prompt")];
    for t in &tokens[7..] {
        rows.push(s.feed(&[*t]).expect("token"));
    }
    assert_eq!(s.position(), 10);
    let incremental = candle_core::Tensor::cat(&rows, 0).expect("cat");
    let mut kv = ContiguousKv::new(spec.layers, 512);
    let whole = edge
        .forward(&tokens, &ForwardCtx::single(0, 10), &mut kv)
        .expect("whole");
    let d = common::max_abs_diff(&incremental, &whole);
    // Row results of a matmul can change in the last bits with the number of rows.
    assert!(d <= 1e-4, "incremental edge differs by {d}");

    assert!(s.feed(&[]).is_err());
    assert!(
        s.feed(&[spec.vocab as u32]).is_err(),
        "token outside the vocabulary"
    );
    assert_eq!(s.position(), 10, "failed feeds consume nothing");
    s.feed(&[5]).expect("still usable");
    assert_eq!(s.position(), 11);
}
