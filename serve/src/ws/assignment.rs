//! Where a session's result goes when it answers a partner's prompt: the [`AssignmentRef`]
//! (prompt and user), how it rides in the saved `Open` frame so that a replica taking the
//! session over knows it, and how results are stored off the session's path.

use std::sync::Arc;

use tandem_protocol::wire::ErrorCode;

use super::Shared;
use crate::rest::store::prompts::{GenerationResult, PromptId, UserId};
use crate::store::now_ms;

/// The partner prompt a session answers, and the user it answers for: where its result goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AssignmentRef {
    pub(crate) prompt: PromptId,
    pub(crate) user: UserId,
}

/// How a claimed assignment is kept in the saved `Open` frame's prompt id, so that a replica
/// taking the session over knows where the result goes. A device cannot send one: a fresh
/// `Open`'s prompt id must be a ticket.
const ASSIGNMENT_MARK: &str = "asg:";

impl AssignmentRef {
    pub(super) fn mark(&self) -> String {
        format!("{ASSIGNMENT_MARK}{}:{}", self.prompt, self.user)
    }

    pub(super) fn from_mark(s: &str) -> Option<Self> {
        let (prompt, user) = s.strip_prefix(ASSIGNMENT_MARK)?.split_once(':')?;
        Some(Self {
            prompt: PromptId::parse(prompt)?,
            user: UserId::parse(user)?,
        })
    }

    /// Records a generation that could not start or ended in an error.
    pub(crate) fn fail_later(&self, shared: &Arc<Shared>, code: ErrorCode) {
        let result = GenerationResult {
            output: String::new(),
            finish_reason: code.as_str().to_owned(),
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft_ms: 0,
            total_ms: 0,
        };
        self.finish_later(shared, Err(result));
    }

    /// Stores the result off the caller's path (a slow store never delays a device).
    pub(crate) fn finish_later(
        &self,
        shared: &Arc<Shared>,
        result: Result<GenerationResult, GenerationResult>,
    ) {
        let shared = shared.clone();
        let a = self.clone();
        tokio::spawn(async move {
            match shared
                .prompts
                .finish(&a.prompt, &a.user, result, now_ms())
                .await
            {
                Ok(true) => crate::rest::webhook::check_later(&shared.webhooks, a.prompt.clone()),
                Ok(false) => {
                    tracing::warn!(prompt = %a.prompt, "result not stored: the assignment was not running")
                }
                Err(e) => tracing::warn!(prompt = %a.prompt, error = %e, "storing a prompt result"),
            }
        });
    }
}
