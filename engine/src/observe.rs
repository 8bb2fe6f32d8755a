//! How the engine tells the outside about its steps without knowing who listens: a server
//! exports these as metrics and trace links; tests and `tandem bench` pass no observer.
//!
//! Every method is called on the engine thread, between or around steps, and must not block:
//! counters and gauges, not I/O.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What an engine step computed, for [`Observer::step_ended`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepFigures {
    /// Wall time of the step (forward pass, sampling, delivery).
    pub took: Duration,
    /// Positions computed (prefill rows and decode rows).
    pub tokens: usize,
    /// Sequences in the batch.
    pub sequences: usize,
}

/// Listens to the engine thread. Every method has a do-nothing default.
pub trait Observer: Send + Sync {
    /// A step (or a test's stall) began.
    fn step_started(&self) {}
    /// The step that began ended; `None` for a test's stall (no figures to record).
    fn step_ended(&self, _step: Option<&StepFigures>) {}
    /// Drafted rows a device sent (speculation).
    fn draft_tokens(&self, _n: usize) {}
    /// Draft tokens a device accepted.
    fn draft_tokens_accepted(&self, _n: usize) {}
    /// The most drafts the engine asked for in its last step's answers.
    fn draft_cap(&self, _cap: u8) {}
    /// Links `step`, the span of one engine step (a root span: a step serves many
    /// generations at once), to the generations it computed.
    fn link_step(&self, _step: &tracing::Span, _parents: &mut dyn Iterator<Item = &TraceParent>) {}
}

/// A generation's trace context, opaque to the engine: the server puts in whatever its
/// tracing library links spans by (an OpenTelemetry `SpanContext`) and reads it back in
/// [`Observer::link_step`].
#[derive(Clone)]
pub struct TraceParent(Arc<dyn Any + Send + Sync>);

impl TraceParent {
    pub fn new<T: Any + Send + Sync>(context: T) -> Self {
        Self(Arc::new(context))
    }

    /// The context, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TraceParent(..)")
    }
}
