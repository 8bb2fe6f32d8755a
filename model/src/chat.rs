//! Chat templates: turning a list of messages into the prompt text a chat model was trained on.
//!
//! Model authors ship their prompt format as a Jinja template (HF `tokenizer_config.json`
//! `chat_template`, or GGUF `tokenizer.chat_template`). [`ChatTemplate`] renders it with
//! minijinja, configured to behave like HuggingFace transformers' renderer:
//! `trim_blocks` and `lstrip_blocks` on, Jinja2's default of dropping one newline at the very
//! end of the source, no auto-escaping, Python string/dict/list methods (`.strip()`,
//! `.startswith()`, `.items()`, …) via `minijinja_contrib::pycompat`, and the globals
//! `raise_exception(msg)` and `strftime_now(fmt)`. The context holds `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token` (empty strings when unknown).
//!
//! # Invariants
//! - A template is compiled once, in [`ChatTemplate::new`]; a template that does not compile is
//!   rejected there, so `render` only fails for runtime reasons (e.g. `raise_exception`).
//! - Rendering is a pure function of the messages, the flag, and BOS/EOS, except for
//!   `strftime_now`, which reads the clock (UTC).

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::{Content, Value};
use minijinja::{context, AutoEscape, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::special_token_text;

/// Name under which the template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// GGUF key holding the template.
const GGUF_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One chat message.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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

/// A compiled chat template with the BOS/EOS texts it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. Fails with [`ModelError::ChatTemplate`] on a syntax error.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Jinja2's default, which transformers keeps: a single newline at the very end of the
        // template source is dropped (newlines the template prints are of course kept).
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ModelError::ChatTemplate(format!("the template does not compile: {e}")))?;
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

    /// The BOS text given to the template as `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS text given to the template as `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The template in a GGUF file's metadata (`tokenizer.chat_template`), with BOS/EOS texts
    /// looked up in its vocabulary. `None` when the file has no template.
    pub fn from_gguf(content: &Content) -> Result<Option<Self>> {
        let source = match content.metadata.get(GGUF_TEMPLATE_KEY) {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(ModelError::ChatTemplate(format!(
                    "GGUF metadata `{GGUF_TEMPLATE_KEY}` should be a string, found {:?}",
                    v.value_type()
                )))
            }
        };
        let tokens = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.as_slice(),
            _ => &[],
        };
        let token_text = |key: &str| -> Option<String> {
            let id = match content.metadata.get(key)? {
                Value::U32(x) => usize::try_from(*x).ok()?,
                Value::I32(x) => usize::try_from(*x).ok()?,
                Value::U64(x) => usize::try_from(*x).ok()?,
                Value::I64(x) => usize::try_from(*x).ok()?,
                Value::U16(x) => usize::from(*x),
                Value::U8(x) => usize::from(*x),
                _ => return None,
            };
            match tokens.get(id)? {
                Value::String(s) => Some(s.clone()),
                _ => None,
            }
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        Self::new(source, bos, eos)
            .map(Some)
            .map_err(|e| ModelError::ChatTemplate(format!("GGUF `{GGUF_TEMPLATE_KEY}`: {e}")))
    }

    /// The template of an HF model directory, from its `tokenizer_config.json` (`path`):
    /// `chat_template` is a string, or a list of `{name, template}` of which the one named
    /// `default` is taken. Without `chat_template`, a `chat_template.jinja` next to the config
    /// (newer transformers) is used. `bos_token`/`eos_token` are strings or `{content: ..}`
    /// objects. `None` when there is no template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let jinja_path = path.with_file_name("chat_template.jinja");
        let (mut source, bos, eos) = if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Format {
                    path: path.into(),
                    format: "tokenizer_config.json",
                    reason: e.to_string(),
                })?;
            let source = match json.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(t) => Some(template_from_json(t).map_err(|reason| ModelError::Format {
                    path: path.into(),
                    format: "tokenizer_config.json",
                    reason,
                })?),
            };
            (
                source,
                special_token_text(json.get("bos_token")),
                special_token_text(json.get("eos_token")),
            )
        } else {
            (None, None, None)
        };
        if source.is_none() && jinja_path.is_file() {
            source = Some(
                std::fs::read_to_string(&jinja_path).map_err(|e| ModelError::io(&jinja_path, e))?,
            );
        }
        let Some(source) = source else {
            return Ok(None);
        };
        Self::new(source, bos, eos)
            .map(Some)
            .map_err(|e| ModelError::ChatTemplate(format!("{}: {e}", path.display())))
    }

    /// Renders the prompt for `messages`. With `add_generation_prompt` the template appends
    /// the header that starts the assistant's reply.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_deref().unwrap_or(""),
                eos_token => self.eos_token.as_deref().unwrap_or(""),
            })
            .map_err(|e| ModelError::ChatTemplate(format!("rendering failed: {e}")))
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of named templates.
fn template_from_json(v: &serde_json::Value) -> std::result::Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(list) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_owned()),
                    (Some(n), Some(_)) => names.push(n.to_owned()),
                    _ => {
                        return Err(
                            "`chat_template` list entries must be {\"name\", \"template\"} objects"
                                .into(),
                        )
                    }
                }
            }
            Err(format!(
                "`chat_template` lists templates {names:?} but none is named \"default\""
            ))
        }
        _ => Err("`chat_template` must be a string or a list of {name, template}".into()),
    }
}

/// `raise_exception(msg)`: lets a template reject its input.
fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {msg}"),
    ))
}

/// `strftime_now(fmt)`: the current UTC time formatted like Python's `strftime`.
fn strftime_now(format: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(i64::try_from(secs).unwrap_or(0), &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Broken-down UTC time.
struct Civil {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    minute: u32,
    second: u32,
    weekday: usize, // 0 = Monday
    yday: u32,      // 1..=366
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn civil(unix_secs: i64) -> Civil {
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let leap_extra = u32::from(month > 2 && is_leap(year));
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday.
        weekday: (days + 3).rem_euclid(7) as usize,
        yday: CUMULATIVE[(month - 1) as usize] + day + leap_extra,
    }
}

/// A subset of C `strftime` (the directives chat templates use); unknown directives are kept
/// as written. `%-d`-style (no padding) modifiers are supported for numeric fields.
fn strftime(unix_secs: i64, format: &str) -> String {
    let t = civil(unix_secs);
    let month_name = MONTHS[(t.month - 1) as usize];
    let weekday_name = WEEKDAYS[t.weekday];
    let hour12 = if t.hour.is_multiple_of(12) {
        12
    } else {
        t.hour % 12
    };
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let num = |v: u32, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let dash = if unpadded { "-" } else { "" };
        let piece = match spec {
            Some('Y') => t.year.to_string(),
            Some('y') => num(t.year.rem_euclid(100) as u32, 2),
            Some('m') => num(t.month, 2),
            Some('d') => num(t.day, 2),
            Some('e') => format!("{:>2}", t.day),
            Some('H') => num(t.hour, 2),
            Some('I') => num(hour12, 2),
            Some('M') => num(t.minute, 2),
            Some('S') => num(t.second, 2),
            Some('j') => num(t.yday, 3),
            Some('p') => if t.hour < 12 { "AM" } else { "PM" }.to_owned(),
            Some('B') => month_name.to_owned(),
            Some('b') | Some('h') => month_name[..3].to_owned(),
            Some('A') => weekday_name.to_owned(),
            Some('a') => weekday_name[..3].to_owned(),
            Some('u') => (t.weekday + 1).to_string(),
            Some('w') => ((t.weekday + 1) % 7).to_string(),
            Some('F') => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            Some('D') => format!("{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100)),
            Some('T') => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            Some('%') => "%".to_owned(),
            Some(other) => format!("%{dash}{other}"),
            None => format!("%{dash}"),
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strftime;

    #[test]
    fn strftime_formats_known_instants() {
        assert_eq!(
            strftime(0, "%Y-%m-%d %H:%M:%S %A"),
            "1970-01-01 00:00:00 Thursday"
        );
        // Leap day, and the Llama-3.1 template's format.
        assert_eq!(strftime(951_782_400, "%d %b %Y"), "29 Feb 2000");
        assert_eq!(strftime(951_782_400, "%j %a %-d/%-m"), "060 Tue 29/2");
        assert_eq!(
            strftime(1_735_689_599, "%F %T %p %I"),
            "2024-12-31 23:59:59 PM 11"
        );
        assert_eq!(strftime(1_735_689_599, "%j %B %%"), "366 December %");
        assert_eq!(strftime(1_735_689_599, "%Q%"), "%Q%");
        // Before the epoch.
        assert_eq!(strftime(-86_400, "%F %A"), "1969-12-31 Wednesday");
    }
}
