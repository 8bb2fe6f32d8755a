//! The endpoint's shared state ([`Service`]): what the routes and every completion read (the
//! client, the model's tokenizer, chat template and context, the user's profile and the
//! sanitizer, the limits), and the store of the most recent finished completions'
//! transparency records ([`Records`]).
//!
//! Plain state below both users: the routes (`service`) prepare and start completions, a
//! completion (`stream`) runs the generation and stores its record; neither needs the other
//! to reach the state.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use tandem_model::chat::ChatTemplate;
use tandem_model::tokenizer::TextTokenizer;
use tokio::sync::Semaphore;

use crate::client::EdgeClient;
use crate::prompt::Profile;
use crate::sanitize::Sanitizer;
use crate::transparency::ModelInfo;

/// What the routes need, shared by every connection.
pub(crate) struct Service {
    pub client: EdgeClient,
    pub tokenizer: TextTokenizer,
    pub chat: Option<ChatTemplate>,
    pub model_info: ModelInfo,
    /// The model's context in tokens.
    pub context: usize,
    pub model_id: String,
    /// Unix seconds when the endpoint started (`created` of the model entry).
    pub started: u64,
    pub system_prompt: Option<String>,
    pub profile: Profile,
    pub sanitizer: Sanitizer,
    pub api_key: Option<String>,
    pub default_max_tokens: u32,
    pub permits: Arc<Semaphore>,
    pub records: Records,
}

/// The records of the most recent finished completions, by id.
pub(crate) struct Records {
    kept: usize,
    entries: Mutex<VecDeque<(String, Value)>>,
}

impl Records {
    pub(crate) fn new(kept: usize) -> Self {
        Self {
            kept,
            entries: Mutex::new(VecDeque::with_capacity(kept.min(1024))),
        }
    }

    /// Keeps `entry` under `id`, forgetting the oldest beyond the limit. (A std `Mutex`:
    /// held for a push or a scan of at most `kept` ids, never across an `.await`.)
    pub(crate) fn put(&self, id: &str, entry: Value) {
        if self.kept == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        while entries.len() >= self.kept {
            entries.pop_front();
        }
        entries.push_back((id.to_owned(), entry));
    }

    pub(crate) fn get(&self, id: &str) -> Option<Value> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, v)| v.clone())
    }
}
