//! Answering an accepted prompt on the device: the [`PromptContext`] a partner's template is
//! rendered with, the generation request that answers it ([`Accepted::request`]), and the
//! inbox calls on [`EdgeClient`] (list, accept, decline, answer).
//!
//! The layer above both the REST calls ([`super::rest`]) and the generation client
//! ([`crate::client`]): the client holds an inbox client, and this module ties the two.

use tandem_model::chat::ChatTemplate;
use tandem_model::tokenizer::TextTokenizer;

use super::api::{Accepted, Inbox, PartnerPrompt, PromptId};
use super::rest::InboxClient;
use crate::bundle::EdgeBundle;
use crate::client::{EdgeClient, GenerateRequest, Generation};
use crate::error::{InboxError, PromptError};
use crate::prompt::{assemble, AssembledPrompt, Profile, PromptTemplate};
use crate::sanitize::Sanitizer;
use crate::transparency::{ModelInfo, TransparencyRecord};

/// What a partner's prompt is rendered with on the device: the user's profile, the sanitizer
/// and the model's tokenizer and chat template.
#[derive(Clone, Copy, Debug)]
pub struct PromptContext<'a> {
    pub profile: &'a Profile,
    pub sanitizer: &'a Sanitizer,
    pub tokenizer: &'a TextTokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
}

impl<'a> PromptContext<'a> {
    /// The tokenizer and chat template of a loaded edge checkpoint, which must have a
    /// tokenizer.
    pub fn from_bundle(
        bundle: &'a EdgeBundle,
        profile: &'a Profile,
        sanitizer: &'a Sanitizer,
    ) -> Result<Self, InboxError> {
        let tokenizer = bundle.tokenizer.as_ref().ok_or_else(|| {
            InboxError::Config("the edge checkpoint has no tokenizer.json".into())
        })?;
        Ok(Self {
            profile,
            sanitizer,
            tokenizer,
            chat_template: bundle.chat_template.as_ref(),
        })
    }
}

impl PartnerPrompt {
    /// The compiled template.
    pub fn compile(&self) -> Result<PromptTemplate, PromptError> {
        PromptTemplate::new(self.template.clone())
    }

    /// Renders the template with the sanitized profile under the system prompt and
    /// tokenizes it. Cheap enough to run before accepting, to learn whether the profile can
    /// answer at all ([`PromptError::MissingFields`] names what is missing).
    pub fn assemble(&self, ctx: &PromptContext<'_>) -> Result<AssembledPrompt, PromptError> {
        self.assemble_with(&self.compile()?, ctx)
    }

    fn assemble_with(
        &self,
        template: &PromptTemplate,
        ctx: &PromptContext<'_>,
    ) -> Result<AssembledPrompt, PromptError> {
        assemble(
            self.system(),
            template,
            ctx.profile,
            ctx.sanitizer,
            ctx.chat_template,
            ctx.tokenizer,
        )
    }
}

impl Accepted {
    /// The generation that answers this prompt: the assembled prompt (the system turn as the
    /// shared prefix), the ticket as prompt id, the partner's `max_tokens` and sampling, no
    /// stop strings, and a transparency record naming the partner and the prompt id.
    pub fn request(
        &self,
        ctx: &PromptContext<'_>,
        model: ModelInfo,
    ) -> Result<GenerateRequest, PromptError> {
        let template = self.prompt.compile()?;
        let prompt = self.prompt.assemble_with(&template, ctx)?;
        let record = TransparencyRecord::new(model, self.prompt.system(), &template, &prompt)
            .for_partner(self.prompt.partner.clone(), self.prompt_id.as_str());
        let mut req = GenerateRequest::from_assembled(&prompt);
        req.prompt_id = Some(self.ticket.expose().to_owned());
        req.max_tokens = self.prompt.max_tokens;
        req.sampling = self.prompt.sampling.clone();
        req.record = Some(record);
        Ok(req)
    }
}

/// The inbox calls on [`EdgeClient`]; they need
/// [`ClientConfig::inbox`](crate::ClientConfig::inbox).
impl EdgeClient {
    fn inbox_client(&self) -> Result<&InboxClient, InboxError> {
        self.inbox.as_ref().ok_or_else(|| {
            InboxError::Config("no inbox configured (set ClientConfig::inbox)".into())
        })
    }

    /// The user's pending prompts.
    pub async fn inbox(&self) -> Result<Inbox, InboxError> {
        self.inbox_client()?.list().await
    }

    /// Accepts a prompt; run it with [`EdgeClient::answer`].
    pub async fn accept(&self, id: &PromptId) -> Result<Accepted, InboxError> {
        self.inbox_client()?.accept(id).await
    }

    /// Declines a prompt.
    pub async fn decline(&self, id: &PromptId) -> Result<(), InboxError> {
        self.inbox_client()?.decline(id).await
    }

    /// Starts the generation that answers an accepted prompt ([`Accepted::request`]). A
    /// prompt the profile cannot fill fails here, before anything is sent.
    pub fn answer(
        &self,
        accepted: &Accepted,
        ctx: &PromptContext<'_>,
    ) -> Result<Generation, InboxError> {
        let req = accepted.request(ctx, self.model_info())?;
        Ok(self.generate(req)?)
    }
}
