//! Text ⇄ token ids.
//!
//! [`TextTokenizer`] wraps a HuggingFace [`tokenizers::Tokenizer`] together with the text and
//! ids of the model's BOS and EOS tokens. It is loaded either from an HF `tokenizer.json` or
//! rebuilt from the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE `gpt2`
//! vocabularies, and SentencePiece BPE `llama` vocabularies with byte fallback), and it can
//! always be saved back as a `tokenizer.json` that [`TextTokenizer::from_file`] loads into the
//! same tokenizer.
//!
//! [`StreamDecoder`] turns a stream of generated ids into text pieces for streaming output.
//!
//! # Invariants
//! - A token id means the same thing in the GGUF vocabulary and in the built tokenizer: GGUF
//!   token `i` has id `i`, and control/user-defined tokens keep their GGUF ids when they become
//!   added tokens (so `<|im_start|>` in a chat-formatted string encodes to its single id).
//! - BOS is added by the post-processor only when the model asks for it
//!   (`tokenizer.ggml.add_bos_token`) and only when `encode` is called with
//!   `add_special_tokens = true`.
//! - The pieces returned by [`StreamDecoder::push`] followed by [`StreamDecoder::finish`]
//!   concatenate to the full decode of the ids (with special tokens skipped), and no piece ends
//!   in a half-finished UTF-8 character.
//!
//! # Layout
//! - this module: [`TextTokenizer`] and [`NamedToken`], loading from `tokenizer.json`.
//! - `gguf`: rebuilding a tokenizer from GGUF metadata (read through `meta`).
//! - `stream`: [`StreamDecoder`].

use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

mod gguf;
mod meta;
mod stream;

pub use stream::StreamDecoder;

/// A token known by both its text and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedToken {
    pub text: String,
    pub id: u32,
}

/// A tokenizer plus the model's BOS/EOS tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<NamedToken>,
    eos: Vec<NamedToken>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads an HF `tokenizer.json`. BOS/EOS texts are taken from a `tokenizer_config.json`
    /// next to it when there is one (a malformed one is ignored here; the chat-template loader
    /// reports it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| ModelError::Format {
            path: path.into(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        let mut tok = Self::from_tokenizer(inner);
        if let Some(dir) = path.parent() {
            let config = dir.join("tokenizer_config.json");
            if let Some((bos, eos)) = read_config_special_tokens(&config) {
                tok.bos = bos.and_then(|t| tok.named(&t));
                tok.eos = eos.and_then(|t| tok.named(&t)).into_iter().collect();
            }
        }
        Ok(tok)
    }

    /// Wraps a tokenizer that has no known BOS/EOS (see [`Self::with_special_tokens`]).
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self {
            inner,
            bos: None,
            eos: Vec::new(),
        }
    }

    /// Sets the BOS and EOS tokens by text. Fails if one of them is not in the vocabulary.
    pub fn with_special_tokens(mut self, bos: Option<&str>, eos: &[&str]) -> Result<Self> {
        let lookup = |t: &str| {
            self.named(t).ok_or_else(|| {
                ModelError::Tokenizer(format!("special token `{t}` is not in the vocabulary"))
            })
        };
        let bos = bos.map(lookup).transpose()?;
        let eos = eos.iter().map(|t| lookup(t)).collect::<Result<Vec<_>>>()?;
        self.bos = bos;
        self.eos = eos;
        Ok(self)
    }

    fn named(&self, text: &str) -> Option<NamedToken> {
        self.token_to_id(text).map(|id| NamedToken {
            text: text.to_owned(),
            id,
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata. `path` is
    /// only used in error messages.
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        gguf::GgufTokenizerBuilder::new(content, path)?.build()
    }

    /// Writes an HF `tokenizer.json` that [`Self::from_file`] loads back into the same tokenizer.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
        std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) always
    /// become their single ids; `add_special_tokens` controls whether the post-processor adds
    /// BOS/EOS around the text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. Ids outside the vocabulary are skipped (as HF does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of a token given its vocabulary text (e.g. `"Ġworld"`, `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token, when known.
    pub fn bos_token(&self) -> Option<&NamedToken> {
        self.bos.as_ref()
    }

    /// The EOS tokens, when known (GGUF EOS first, then end-of-turn/end-of-message tokens).
    pub fn eos_tokens(&self) -> &[NamedToken] {
        &self.eos
    }

    /// Ids of [`Self::eos_tokens`].
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.iter().map(|t| t.id).collect()
    }

    /// Whether `id` is a special (control) token, skipped by `decode(.., true)`.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Reads `bos_token` / `eos_token` from an HF `tokenizer_config.json`; `None` if the file is
/// absent or unreadable.
fn read_config_special_tokens(path: &Path) -> Option<(Option<String>, Option<String>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(
                "{}: ignoring malformed tokenizer config: {e}",
                path.display()
            );
            return None;
        }
    };
    Some((
        special_token_text(json.get("bos_token")),
        special_token_text(json.get("eos_token")),
    ))
}

/// The text of a special token in `tokenizer_config.json`: a string, or an object with
/// `content` (the serialised `AddedToken`).
pub(crate) fn special_token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}
