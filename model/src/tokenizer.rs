//! The text tokenizer: HF `tokenizer.json`, or one built from a GGUF file's vocabulary.
//!
//! [`TextTokenizer`] wraps the `tokenizers` crate. From GGUF it rebuilds what the HF file would
//! say: a byte-level BPE over `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the
//! pre-tokenizer named by `tokenizer.ggml.pre`, control and user-defined tokens as added tokens
//! (so `<|im_start|>` in a rendered chat prompt encodes to its one id), and BOS prepended when
//! `tokenizer.ggml.add_bos_token` says so. Only byte-level BPE vocabularies (`gpt2`, which
//! Llama 3, SmolLM and most recent Llama-family models use) are built; SentencePiece (`llama`)
//! vocabularies are refused with a clear error.
//!
//! [`StreamDecoder`] turns token ids into text as they arrive, never cutting a multi-byte
//! character in half.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// The Llama 3 pre-tokenizer regex (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// A tokenizer and the ids of its special tokens.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

fn tok_err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{context}: {e}"))
}

impl TextTokenizer {
    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Format {
            path: path.into(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// Wraps an existing tokenizer.
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self { inner }
    }

    /// Builds the tokenizer from GGUF metadata (`path` is used in messages).
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let ctx = |key: &str| format!("{}: `{key}`", path.display());
        let get_str = |key: &str| -> Result<Option<String>> {
            md.get(key)
                .map(|v| v.to_string().cloned().map_err(|e| tok_err(ctx(key), e)))
                .transpose()
        };
        let get_u32 = |key: &str| -> Result<Option<u32>> {
            md.get(key)
                .map(|v| v.to_u32().map_err(|e| tok_err(ctx(key), e)))
                .transpose()
        };
        let get_strings = |key: &str| -> Result<Vec<String>> {
            let Some(v) = md.get(key) else {
                return Ok(Vec::new());
            };
            v.to_vec()
                .map_err(|e| tok_err(ctx(key), e))?
                .iter()
                .map(|s| s.to_string().cloned().map_err(|e| tok_err(ctx(key), e)))
                .collect()
        };
        let model = get_str("tokenizer.ggml.model")?.unwrap_or_default();
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "{}: tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is); \
                 convert the model with its tokenizer.json instead",
                path.display()
            )));
        }
        let tokens = get_strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(tok_err(ctx("tokenizer.ggml.tokens"), "missing or empty"));
        }
        let merges: Vec<(String, String)> = get_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(ctx("tokenizer.ggml.merges"), format!("bad merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .to_vec()
                .map_err(|e| tok_err(ctx("tokenizer.ggml.token_type"), e))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| tok_err(ctx("tokenizer.ggml.token_type"), e)))
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(tok_err(
                ctx("tokenizer.ggml.token_type"),
                format!("{} types for {} tokens", types.len(), tokens.len()),
            ));
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path.display(), e))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = get_str("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
        let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let pre_tokenizer = match pre.as_str() {
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            "llama-bpe" | "llama3" | "llama-v3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(ctx("tokenizer.ggml.pre"), e))?;
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    byte_level(false),
                ]))
            }
            _ => byte_level(true),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_CONTROL))
            .collect();
        inner.add_special_tokens(&added);
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        if add_bos {
            if let Some(bos) = get_u32("tokenizer.ggml.bos_token_id")? {
                let text = tokens
                    .get(bos as usize)
                    .ok_or_else(|| tok_err(ctx("tokenizer.ggml.bos_token_id"), "outside the vocabulary"))?;
                let post = TemplateProcessing::builder()
                    .try_single(format!("{text}:0 $A:0"))
                    .and_then(|b| b.try_pair(format!("{text}:0 $A:0 {text}:1 $B:1")))
                    .map_err(|e| tok_err(ctx("tokenizer.ggml.bos_token_id"), e))?
                    .special_tokens(vec![(text.clone(), bos)])
                    .build()
                    .map_err(|e| tok_err(ctx("tokenizer.ggml.bos_token_id"), e))?;
                inner.with_post_processor(Some(post));
            }
        }
        Ok(Self { inner })
    }

    /// Writes an HF `tokenizer.json` that [`Self::from_file`] reads back.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| ModelError::Format {
            path: path.into(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds BOS where the tokenizer wants it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode", e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer: feed ids one by one, get the text that became final.
///
/// Decodes a short window of recent tokens and emits only what the newest token added, so a
/// character split over several byte-level tokens comes out once, whole. Special tokens are
/// skipped.
pub struct StreamDecoder<'a> {
    tok: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window of ids already turned into text.
    prefix: usize,
    /// End of that window (ids before `read` are emitted).
    read: usize,
}

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder").field("ids", &self.ids.len()).finish()
    }
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a TextTokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one token; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Flushes whatever is held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}
