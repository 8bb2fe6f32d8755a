//! Chat templates: the model's own Jinja template, rendered with minijinja.
//!
//! HF chat templates are Jinja written for Python, so the environment here adds what they
//! lean on: Python string and dict methods (`.strip()`, `.startswith()`, `.items()`, through
//! minijinja-contrib's pycompat), `raise_exception(msg)` (becomes a [`ModelError::ChatTemplate`]
//! carrying the message), `strftime_now(fmt)`, and the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`. A template is compiled once, when the
//! [`ChatTemplate`] is built, and rendered many times.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bytes", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        // The source compiled once already; compiling it again cannot fail.
        Self::new(self.source.clone(), self.bos_token.clone(), self.eos_token.clone())
            .unwrap_or_else(|_| unreachable!("a compiled template recompiles"))
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now` for templates that print today's date; supports `%Y %m %d %B %b %H %M %S`.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles `source`; fails with the template's syntax error.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_keep_trailing_newline(true);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with its BOS/EOS token text.
    pub fn from_gguf(content: &Content) -> Result<Option<Self>> {
        let md = &content.metadata;
        let Some(src) = md.get("tokenizer.chat_template") else {
            return Ok(None);
        };
        let src = src
            .to_string()
            .map_err(|e| ModelError::ChatTemplate(format!("tokenizer.chat_template: {e}")))?;
        let tokens = md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok());
        let token_text = |key: &str| -> Option<String> {
            let id = md.get(key)?.to_u32().ok()? as usize;
            tokens?.get(id)?.to_string().ok().cloned()
        };
        Self::new(
            src.clone(),
            token_text("tokenizer.ggml.bos_token_id"),
            token_text("tokenizer.ggml.eos_token_id"),
        )
        .map(Some)
    }

    /// The template of an HF `tokenizer_config.json` (`chat_template`: a string, or a list of
    /// named templates of which `default` is taken). `Ok(None)` when the file or the key is
    /// absent.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: path.into(),
            format: "JSON",
            reason: e.to_string(),
        })?;
        let src = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first());
                match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(s) => s.to_string(),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        Self::new(src, token("bos_token"), token("eos_token"))
            .map_err(|e| ModelError::ChatTemplate(format!("{}: {e}", path.display())))
            .map(Some)
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}
