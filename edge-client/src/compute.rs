//! The edge's model compute, kept off the async runtime.
//!
//! A generation's [`EdgeCompute`] owns everything the edge layers touch: the
//! [`EdgeSession`] (shared weights plus this generation's KV cache), the noiser, and the
//! wire encoding. Each step (a prompt chunk, or the one token the cloud sent back) runs on
//! tokio's blocking pool through [`EdgeCompute::spawn`]: the value moves to a blocking
//! thread, computes, and comes back with the encoded `Hidden` frame. No async worker ever
//! runs a forward pass, so an app's single-threaded runtime keeps its timers, and the driver
//! keeps answering the cloud, while a long prompt is computed.
//!
//! Invariants: one step at a time per generation (the value is moved out while it runs, so
//! a second step cannot start); a step either consumes its tokens and returns their frame,
//! or fails and consumes nothing ([`EdgeSession::feed`]'s contract).
//!
//! Costs: one blocking-pool hand-off per step (two thread wake-ups; not measured on its
//! own, and small beside the step: the demo model's edge layer took 4.7 ms per decode step
//! in a debug build on a busy 2-core machine), the forward pass itself, one f32 copy of the
//! rows, and the encoding into the wire dtype.

use std::time::{Duration, Instant};

use candle_core::DType;
use tandem_model::privacy::RowNoiser;
use tandem_protocol::{f32_to_hidden, HiddenDtype, HiddenRef};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Bytes;

use crate::error::ClientError;
use crate::session::EdgeSession;

/// One step of the edge layers.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub ids: Vec<u32>,
    /// Sequence number of the frame it becomes.
    pub seq: u64,
    /// Whether the frame ends the prompt (or is a decode step).
    pub complete: bool,
    /// The last `drafts` ids are the device's drafts (speculation).
    pub drafts: u8,
    /// Where the step starts: positions from here on are forgotten first (the drafts of the
    /// last step the cloud did not confirm). `None`: where the last step ended.
    pub at: Option<usize>,
}

/// The result of a step.
#[derive(Debug)]
pub(crate) struct Computed {
    /// The encoded `Hidden` frame.
    pub frame: Bytes,
    /// Time spent in the edge layers and the encoding.
    pub elapsed: Duration,
}

/// The edge side of one generation. See the module doc.
#[derive(Debug)]
pub(crate) struct EdgeCompute {
    session: EdgeSession,
    noiser: Option<RowNoiser>,
    hidden_size: usize,
    dtype: HiddenDtype,
}

impl EdgeCompute {
    pub(crate) fn new(session: EdgeSession, noiser: Option<RowNoiser>, dtype: HiddenDtype) -> Self {
        let hidden_size = session.model().config().hidden_size;
        Self {
            session,
            noiser,
            hidden_size,
            dtype,
        }
    }

    /// The noiser's running totals, for the transparency record.
    pub(crate) fn noiser(&self) -> Option<&RowNoiser> {
        self.noiser.as_ref()
    }

    /// Runs `step` on the blocking pool; the value comes back with the result.
    pub(crate) fn spawn(mut self, step: Step) -> JoinHandle<(Self, Result<Computed, ClientError>)> {
        tokio::task::spawn_blocking(move || {
            let result = self.run(&step);
            (self, result)
        })
    }

    /// Runs the edge layers over `step.ids`, noises the rows when asked, and encodes the
    /// frame. Synchronous and CPU-bound: call it through [`Self::spawn`] from async code.
    pub(crate) fn run(&mut self, step: &Step) -> Result<Computed, ClientError> {
        let started = Instant::now();
        if let Some(at) = step.at {
            self.session.truncate(at)?;
        }
        let position = self.session.position();
        let hidden = self.session.feed(&step.ids)?;
        let mut values: Vec<f32> = hidden
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(tandem_model::ModelError::from)?;
        if let Some(noiser) = self.noiser.as_mut() {
            // Before compression: the noise is part of what the wire dtype then rounds.
            noiser.apply(&mut values, self.hidden_size)?;
        }
        let mut payload = Vec::new();
        f32_to_hidden(
            self.dtype,
            step.ids.len(),
            self.hidden_size,
            &values,
            &mut payload,
        )?;
        let frame = HiddenRef {
            seq: step.seq,
            first_position: position as u32,
            token_count: step.ids.len() as u32,
            complete: step.complete,
            drafts: step.drafts,
            dtype: self.dtype,
            payload: &payload,
        }
        .encode()?;
        Ok(Computed {
            frame: Bytes::from(frame),
            elapsed: started.elapsed(),
        })
    }
}
