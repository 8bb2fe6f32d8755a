//! Prompt assembly on the device: profile + template → sanitized text → chat prompt → token ids.
//!
//! A third party's [`PromptTemplate`] (minijinja) is rendered with fields of the user's local
//! [`Profile`]; every profile value is passed through the [`Sanitizer`] before the template
//! sees it. The rendered text becomes the user turn, the provider's system prompt the system
//! turn, and the model's [`ChatTemplate`] and [`TextTokenizer`] turn both into token ids:
//! an [`AssembledPrompt`].
//!
//! # Rendering rules
//! - Strict undefined: a template naming a field the profile lacks fails with
//!   [`PromptError::MissingFields`], which names it (`{% if budget is defined %}` still works
//!   for optional fields).
//! - Arrays render as comma-separated lists (`hiking, jazz`), objects as `key: value; …`
//!   (in parentheses inside a list). Strings render as they are: no HTML escaping.
//! - The rendered text may not contain the model's control tokens (`<|im_start|>`, …): a
//!   template or profile value cannot open a chat turn of its own
//!   ([`PromptError::ControlToken`]).
//! - Profile settings ([`SETTINGS_KEYS`], e.g. `auto_accept_partners`) are not fields: a
//!   template that names one gets [`PromptError::MissingFields`] like any absent field.
//! - `fields_used` is exact: it lists the profile fields the rendering actually read (a field
//!   named only in a branch not taken is not used), recorded as the template looks them up.
//!   Only those fields are sanitized, and only their redactions are reported.
//!
//! # The shared system prefix
//! The cloud's KV cache shares blocks between sessions whose token prefixes are equal. The
//! system turn is the same for every user, so [`AssembledPrompt::system_prefix_len`] marks it:
//! `ids[..system_prefix_len]` depends only on the system prompt, the chat template and the
//! tokenizer, never on the profile or the third-party prompt, and the device sends it as its own
//! chunk. It is computed by rendering the chat template with the system message alone,
//! tokenizing that, and taking the longest common token prefix with the full prompt's ids: those
//! tokens equal the system-only tokens, so they cannot depend on the user turn even where a
//! template closes the system turn differently or a token merges across the boundary.
//!
//! # Costs
//! One template render, one sanitizer pass per used field, two chat-template renders and three
//! tokenizer calls (the user turn alone for the control-token check, the full prompt, and the
//! short system-only rendering).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::tokenizer::TextTokenizer;

pub use crate::error::PromptError;
use crate::sanitize::{Redaction, Sanitizer};

/// Name of the template in its environment (appears in error messages).
const TEMPLATE_NAME: &str = "prompt";

// ---------------------------------------------------------------------------------------------
// Profile
// ---------------------------------------------------------------------------------------------

/// The user's local profile: a JSON object of named fields. Never leaves the device; its
/// `Debug` output shows field names only.
///
/// A few top-level keys are settings of the device, not fields ([`ProfileSettings`],
/// [`SETTINGS_KEYS`]): they are taken out when the profile is parsed, so a template cannot
/// read them (`{{ auto_accept_partners }}` is a missing field) and they never enter a prompt.
#[derive(Clone, Default, PartialEq)]
pub struct Profile {
    fields: serde_json::Map<String, Json>,
    settings: ProfileSettings,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish()
    }
}

/// The profile key listing partners whose inbox prompts are answered without asking.
pub const AUTO_ACCEPT_PARTNERS: &str = "auto_accept_partners";

/// Top-level profile keys that are settings, not fields.
pub const SETTINGS_KEYS: &[&str] = &[AUTO_ACCEPT_PARTNERS];

/// The device settings a profile file may carry beside its fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    /// `"auto_accept_partners": ["Acme Shop", …]`: partner names (matched exactly) whose
    /// inbox prompts the device answers without asking (see `inbox::AutoAccept`).
    pub auto_accept_partners: Vec<String>,
}

impl ProfileSettings {
    /// Takes the settings keys out of `fields`.
    fn take_from(fields: &mut serde_json::Map<String, Json>) -> Result<Self, PromptError> {
        let bad = |reason: String| PromptError::ProfileSetting {
            path: None,
            key: AUTO_ACCEPT_PARTNERS,
            reason,
        };
        let auto_accept_partners = match fields.remove(AUTO_ACCEPT_PARTNERS) {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Json::String(name) => Ok(name),
                    other => Err(bad(format!(
                        "must list partner names as strings, found {}",
                        json_kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "must be an array of partner names, found {}",
                    json_kind(&other)
                )))
            }
        };
        Ok(Self {
            auto_accept_partners,
        })
    }
}

impl Profile {
    /// A profile from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, PromptError> {
        Self::parse(text, None)
    }

    /// A profile from a JSON file.
    pub fn from_file(path: &Path) -> Result<Self, PromptError> {
        let text = std::fs::read_to_string(path).map_err(|error| PromptError::Read {
            what: "profile",
            path: path.into(),
            error,
        })?;
        Self::parse(&text, Some(path))
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Self, PromptError> {
        // serde_json's syntax errors name the position and what was expected, not the text.
        let json: Json = serde_json::from_str(text).map_err(|e| PromptError::ProfileJson {
            path: path.map(Into::into),
            reason: e.to_string(),
        })?;
        Self::from_value(json).map_err(|e| match e {
            PromptError::ProfileNotObject { found, .. } => PromptError::ProfileNotObject {
                path: path.map(Into::into),
                found,
            },
            PromptError::ProfileSetting { key, reason, .. } => PromptError::ProfileSetting {
                path: path.map(Into::into),
                key,
                reason,
            },
            other => other,
        })
    }

    /// A profile from a JSON value, which must be an object. The settings keys
    /// ([`SETTINGS_KEYS`]) are taken out of the fields.
    pub fn from_value(json: Json) -> Result<Self, PromptError> {
        match json {
            Json::Object(mut fields) => {
                let settings = ProfileSettings::take_from(&mut fields)?;
                Ok(Self { fields, settings })
            }
            other => Err(PromptError::ProfileNotObject {
                path: None,
                found: json_kind(&other),
            }),
        }
    }

    /// The device settings that came with the profile.
    pub fn settings(&self) -> &ProfileSettings {
        &self.settings
    }

    /// A field's (unsanitized) value. Settings are not fields.
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.fields.get(name)
    }

    /// Field names, sorted.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// Whether a dotted path (`address.city`) resolves through nested objects.
    fn has_path(&self, path: &str) -> bool {
        let mut parts = path.split('.');
        let Some(first) = parts.next() else {
            return false;
        };
        let mut cur = self.fields.get(first);
        for part in parts {
            cur = cur.and_then(|v| v.get(part));
        }
        cur.is_some()
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Template
// ---------------------------------------------------------------------------------------------

/// A profile field that entered the prompt, with its sanitized value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldUse {
    pub name: String,
    pub value: Json,
}

/// A rendered template: the user turn's text and what went into it.
#[derive(Clone, PartialEq)]
pub struct RenderedPrompt {
    pub text: String,
    /// The fields the rendering read, sorted by name, with their sanitized values.
    pub fields_used: Vec<FieldUse>,
    /// Redactions in those fields, by field then rule order.
    pub redactions: Vec<Redaction>,
}

impl fmt::Debug for RenderedPrompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderedPrompt")
            .field("text_len", &self.text.len())
            .field(
                "fields_used",
                &self.fields_used.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .field("redactions", &self.redactions)
            .finish()
    }
}

/// A compiled third-party prompt template (minijinja syntax; see the module doc).
#[derive(Clone)]
pub struct PromptTemplate {
    env: Environment<'static>,
    source: String,
}

impl fmt::Debug for PromptTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptTemplate")
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl PromptTemplate {
    /// Compiles `source`; a syntax error is [`PromptError::TemplateSyntax`].
    pub fn new(source: impl Into<String>) -> Result<Self, PromptError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(|out, _state, value| {
            let mut text = String::new();
            format_value(&mut text, value, false);
            out.write_str(&text).map_err(|_| {
                minijinja::Error::new(ErrorKind::WriteFailure, "cannot write the prompt")
            })
        });
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| PromptError::TemplateSyntax(e.to_string()))?;
        Ok(Self { env, source })
    }

    /// Reads and compiles a template file.
    pub fn from_file(path: &Path) -> Result<Self, PromptError> {
        let text = std::fs::read_to_string(path).map_err(|error| PromptError::Read {
            what: "prompt template",
            path: path.into(),
            error,
        })?;
        Self::new(text)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The top-level names the template may look up in the profile (static analysis: every
    /// branch counts; template globals such as `range` are left out). Lets an app tell the
    /// user which fields a prompt wants before it runs.
    pub fn referenced_fields(&self) -> BTreeSet<String> {
        let globals: BTreeSet<&str> = self.env.globals().map(|(k, _)| k).collect();
        self.env
            .get_template(TEMPLATE_NAME)
            .map(|t| t.undeclared_variables(false))
            .unwrap_or_default()
            .into_iter()
            .filter(|name| !globals.contains(name.as_str()))
            .collect()
    }

    /// Renders the template with `profile`'s fields, each sanitized by `sanitizer` when the
    /// template first reads it.
    pub fn render(
        &self,
        profile: &Profile,
        sanitizer: &Sanitizer,
    ) -> Result<RenderedPrompt, PromptError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| PromptError::TemplateSyntax(e.to_string()))?;
        let ctx = Arc::new(TrackedProfile {
            fields: profile.fields.clone(),
            sanitizer: sanitizer.clone(),
            lookups: Mutex::default(),
        });
        let result = template.render(Value::from_dyn_object(ctx.clone()));
        let lookups =
            std::mem::take(&mut *ctx.lookups.lock().unwrap_or_else(PoisonError::into_inner));
        match result {
            Ok(text) => {
                let mut fields_used = Vec::with_capacity(lookups.used.len());
                let mut redactions = Vec::new();
                for (name, used) in lookups.used {
                    redactions.extend(used.redactions);
                    fields_used.push(FieldUse {
                        name,
                        value: used.json,
                    });
                }
                Ok(RenderedPrompt {
                    text,
                    fields_used,
                    redactions,
                })
            }
            Err(e) if e.kind() == ErrorKind::UndefinedError => {
                Err(self.undefined_error(&template, profile, &lookups.missing, e))
            }
            Err(e) => Err(PromptError::TemplateRender(e.to_string())),
        }
    }

    /// Names what was undefined: top-level names the template looked up and the profile lacks
    /// (template globals excluded), else nested paths (`address.zip`) that do not resolve.
    fn undefined_error(
        &self,
        template: &minijinja::Template<'_, '_>,
        profile: &Profile,
        missing: &BTreeSet<String>,
        err: minijinja::Error,
    ) -> PromptError {
        let globals: BTreeSet<&str> = self.env.globals().map(|(k, _)| k).collect();
        let mut fields: Vec<String> = missing
            .iter()
            .filter(|m| !globals.contains(m.as_str()))
            .cloned()
            .collect();
        if fields.is_empty() {
            let mut nested: Vec<String> = template
                .undeclared_variables(true)
                .into_iter()
                .filter(|p| p.contains('.') && !profile.has_path(p))
                .collect();
            nested.sort();
            fields = nested;
        }
        if fields.is_empty() {
            PromptError::TemplateRender(err.to_string())
        } else {
            PromptError::MissingFields { fields }
        }
    }
}

/// Renders a value for the prompt: lists comma-separated, objects as `key: value; …`.
fn format_value(out: &mut String, value: &Value, nested: bool) {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => {}
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    format_value(out, &item, true);
                }
            }
        }
        ValueKind::Map => {
            if nested {
                out.push('(');
            }
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str("; ");
                    }
                    format_value(out, &key, true);
                    out.push_str(": ");
                    if let Ok(v) = value.get_item(&key) {
                        format_value(out, &v, true);
                    }
                }
            }
            if nested {
                out.push(')');
            }
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// One field the template read: its sanitized value for the record and for rendering.
#[derive(Debug)]
struct UsedField {
    json: Json,
    value: Value,
    redactions: Vec<Redaction>,
}

#[derive(Debug, Default)]
struct Lookups {
    used: BTreeMap<String, UsedField>,
    /// Names looked up that the profile lacks (may include template globals).
    missing: BTreeSet<String>,
}

/// The template's root context: serves profile fields, sanitizing each on first read and
/// recording which were read. (A std `Mutex`: rendering is synchronous and the lock is never
/// held across anything but a map update and one sanitizer pass.)
#[derive(Debug)]
struct TrackedProfile {
    fields: serde_json::Map<String, Json>,
    sanitizer: Sanitizer,
    lookups: Mutex<Lookups>,
}

impl Object for TrackedProfile {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let mut lookups = self.lookups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(used) = lookups.used.get(name) {
            return Some(used.value.clone());
        }
        let Some(raw) = self.fields.get(name) else {
            lookups.missing.insert(name.to_owned());
            return None;
        };
        let (json, redactions) = self.sanitizer.sanitize_json(name, raw);
        let value = Value::from_serialize(&json);
        lookups.used.insert(
            name.to_owned(),
            UsedField {
                json,
                value: value.clone(),
                redactions,
            },
        );
        Some(value)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        // Listing the whole profile would read every field without recording it.
        Enumerator::NonEnumerable
    }
}

// ---------------------------------------------------------------------------------------------
// Assembly
// ---------------------------------------------------------------------------------------------

/// A prompt ready for the edge model.
#[derive(Clone, PartialEq)]
pub struct AssembledPrompt {
    /// The chat-formatted prompt's token ids.
    pub ids: Vec<u32>,
    /// `ids[..system_prefix_len]` is the same for every user (the system turn); 0 without a
    /// system prompt.
    pub system_prefix_len: usize,
    /// Bytes of the chat-formatted prompt text.
    pub text_len: usize,
    /// The user turn: the rendered template, sanitized.
    pub user_prompt: String,
    pub fields_used: Vec<FieldUse>,
    pub redactions: Vec<Redaction>,
}

impl fmt::Debug for AssembledPrompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssembledPrompt")
            .field("tokens", &self.ids.len())
            .field("system_prefix_len", &self.system_prefix_len)
            .field("text_len", &self.text_len)
            .field(
                "fields_used",
                &self.fields_used.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .field("redactions", &self.redactions)
            .finish()
    }
}

impl AssembledPrompt {
    /// The tokens shared by every user (send as their own chunk).
    pub fn system_prefix(&self) -> &[u32] {
        &self.ids[..self.system_prefix_len]
    }

    /// The tokens after the shared prefix.
    pub fn user_part(&self) -> &[u32] {
        &self.ids[self.system_prefix_len..]
    }
}

/// Assembles a prompt: renders `template` with the sanitized `profile`, puts the provider's
/// `system_prompt` and the result into the model's `chat_template` (with the generation
/// prompt), and tokenizes. Without a chat template the rendered text is tokenized as it is
/// (with the tokenizer's special tokens) and a system prompt is an error.
pub fn assemble(
    system_prompt: Option<&str>,
    template: &PromptTemplate,
    profile: &Profile,
    sanitizer: &Sanitizer,
    chat_template: Option<&ChatTemplate>,
    tokenizer: &TextTokenizer,
) -> Result<AssembledPrompt, PromptError> {
    let rendered = template.render(profile, sanitizer)?;
    reject_control_tokens(&rendered.text, tokenizer)?;
    let (ids, system_prefix_len, text_len) = match chat_template {
        None => {
            if system_prompt.is_some() {
                return Err(PromptError::SystemWithoutChatTemplate);
            }
            let ids = tokenizer.encode(&rendered.text, true)?;
            (ids, 0, rendered.text.len())
        }
        Some(chat) => {
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = system_prompt {
                messages.push(ChatMessage::system(system));
            }
            messages.push(ChatMessage::user(rendered.text.clone()));
            let text = chat.render(&messages, true)?;
            // The template writes BOS itself where the model wants it.
            let ids = tokenizer.encode(&text, false)?;
            let prefix = match system_prompt {
                Some(system) => shared_prefix_len(system, chat, tokenizer, &text, &ids)?,
                None => 0,
            };
            (ids, prefix, text.len())
        }
    };
    if ids.is_empty() {
        return Err(PromptError::EmptyPrompt);
    }
    Ok(AssembledPrompt {
        ids,
        system_prefix_len,
        text_len,
        user_prompt: rendered.text,
        fields_used: rendered.fields_used,
        redactions: rendered.redactions,
    })
}

/// A third party's template must not be able to write chat structure of its own (close the
/// user turn and open one posing as the provider's system prompt), nor can a profile value:
/// the user turn may not tokenize to any special (control) token.
pub(crate) fn reject_control_tokens(
    text: &str,
    tokenizer: &TextTokenizer,
) -> Result<(), PromptError> {
    let ids = tokenizer.encode(text, false)?;
    let added = tokenizer.inner().get_added_tokens_decoder();
    match ids
        .iter()
        .find_map(|id| added.get(id).filter(|t| t.special))
    {
        Some(token) => Err(PromptError::ControlToken(token.content.clone())),
        None => Ok(()),
    }
}

/// How many leading tokens of `full_ids` (the tokens of `full_text`) depend on the system
/// prompt only: the longest common prefix with the tokens of the system-only rendering, cut
/// first to the text the full prompt starts with. 0 when the template cannot render a system
/// message alone (some require a user turn): sharing is lost, correctness is not.
pub(crate) fn shared_prefix_len(
    system: &str,
    chat: &ChatTemplate,
    tokenizer: &TextTokenizer,
    full_text: &str,
    full_ids: &[u32],
) -> Result<usize, PromptError> {
    let Ok(system_text) = chat.render(&[ChatMessage::system(system)], false) else {
        return Ok(0);
    };
    let common = common_text_prefix(&system_text, full_text);
    if common == 0 {
        return Ok(0);
    }
    let system_ids = tokenizer.encode(&system_text[..common], false)?;
    Ok(system_ids
        .iter()
        .zip(full_ids)
        .take_while(|(a, b)| a == b)
        .count())
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_text_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_on_char_boundary() {
        assert_eq!(common_text_prefix("abc", "abd"), 2);
        assert_eq!(common_text_prefix("abc", "abcdef"), 3);
        assert_eq!(common_text_prefix("aé", "aè"), 1);
        assert_eq!(common_text_prefix("", "x"), 0);
    }

    #[test]
    fn lists_and_objects_render_readably() -> Result<(), PromptError> {
        let profile = Profile::from_json_str(
            r#"{"xs": ["a", "b", 3], "o": {"k": "v", "n": [1, 2]}, "ps": [{"i": "x", "p": 2}]}"#,
        )?;
        let t = PromptTemplate::new("{{ xs }}|{{ o }}|{{ ps }}|{{ xs | join('+') }}")?;
        let out = t.render(&profile, &Sanitizer::none())?;
        assert_eq!(out.text, "a, b, 3|k: v; n: 1, 2|(i: x; p: 2)|a+b+3");
        Ok(())
    }

    #[test]
    fn globals_are_not_fields() -> Result<(), PromptError> {
        let t = PromptTemplate::new("{% for i in range(2) %}{{ name }}{% endfor %}")?;
        assert_eq!(t.referenced_fields(), BTreeSet::from(["name".to_owned()]));
        let err = t
            .render(&Profile::default(), &Sanitizer::none())
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the prompt template uses the field `name` that the profile does not have")
        );
        Ok(())
    }
}
