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

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken as TemplateToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{ModelError, Result};

/// The Llama-3 pre-tokenizer regex (also used by llama.cpp for `llama-bpe` and `smaug-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer regex: like Llama-3's, but digits are split one by one.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The SentencePiece word-boundary marker.
const SPM_SPACE: char = '▁';

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

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
        GgufTokenizerBuilder::new(content, path)?.build()
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

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

/// Typed access to GGUF metadata, with errors that name the key and the file.
struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn err(&self, key: &str, reason: impl fmt::Display) -> ModelError {
        ModelError::Tokenizer(format!(
            "{}: GGUF metadata `{key}` {reason}",
            self.path.display()
        ))
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(
                key,
                format!("should be a string, found {:?}", v.value_type()),
            )),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match value_as_i64(v) {
                Some(0) => Ok(Some(false)),
                Some(1) => Ok(Some(true)),
                _ => Err(self.err(key, format!("should be a bool, found {v:?}"))),
            },
        }
    }

    /// A token id: any non-negative integer below `vocab_len`. Negative values (some
    /// converters write -1 for "none") count as absent.
    fn token_id(&self, key: &str, vocab_len: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = value_as_i64(v)
            .ok_or_else(|| self.err(key, format!("should be an integer, found {v:?}")))?;
        if n < 0 {
            return Ok(None);
        }
        match u32::try_from(n) {
            Ok(id) if (id as usize) < vocab_len => Ok(Some(id)),
            _ => Err(self.err(
                key,
                format!("is {n}, outside the vocabulary of {vocab_len} tokens"),
            )),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(
                key,
                format!("should be an array, found {:?}", v.value_type()),
            )),
        }
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(key, format!("element {i} should be a string, found {v:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                value_as_i64(v).ok_or_else(|| {
                    self.err(
                        key,
                        format!("element {i} should be an integer, found {v:?}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn float_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(f64::from(*x)),
                Value::F64(x) => Ok(*x),
                v => value_as_i64(v).map(|x| x as f64).ok_or_else(|| {
                    self.err(key, format!("element {i} should be a number, found {v:?}"))
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// The vocabulary family named by `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VocabKind {
    /// `gpt2`: byte-level BPE with merges.
    ByteLevelBpe,
    /// `llama`: SentencePiece BPE with scores and `<0xNN>` byte fallback.
    SentencePieceBpe,
}

struct GgufTokenizerBuilder<'a> {
    meta: Meta<'a>,
    kind: VocabKind,
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl<'a> GgufTokenizerBuilder<'a> {
    fn new(content: &'a Content, path: &'a Path) -> Result<Self> {
        let meta = Meta { content, path };
        let model_key = "tokenizer.ggml.model";
        let kind = match meta.string(model_key)? {
            Some("gpt2") => VocabKind::ByteLevelBpe,
            Some("llama") => VocabKind::SentencePieceBpe,
            Some(other) => {
                return Err(meta.err(
                    model_key,
                    format!(
                        "names the tokenizer model `{other}`, which is not supported \
                         (supported: `gpt2` byte-level BPE, `llama` SentencePiece BPE)"
                    ),
                ))
            }
            None => return Err(meta.err(model_key, "is missing")),
        };
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens = meta
            .string_array(tokens_key)?
            .ok_or_else(|| meta.err(tokens_key, "is missing"))?;
        if tokens.is_empty() {
            return Err(meta.err(tokens_key, "is empty"));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(meta.err(tokens_key, "has more than u32::MAX tokens"));
        }
        let types_key = "tokenizer.ggml.token_type";
        let types = match meta.int_array(types_key)? {
            Some(t) if t.len() != tokens.len() => {
                return Err(meta.err(
                    types_key,
                    format!(
                        "has {} entries but `{tokens_key}` has {}",
                        t.len(),
                        tokens.len()
                    ),
                ))
            }
            Some(t) => t,
            None => vec![token_type::NORMAL; tokens.len()],
        };
        Ok(Self {
            meta,
            kind,
            tokens,
            types,
        })
    }

    fn build(self) -> Result<TextTokenizer> {
        let n = self.tokens.len();
        let meta = &self.meta;
        let bos_key = "tokenizer.ggml.bos_token_id";
        let eos_key = "tokenizer.ggml.eos_token_id";
        let bos = meta.token_id(bos_key, n)?;
        let eos = meta.token_id(eos_key, n)?;
        let unk = meta.token_id("tokenizer.ggml.unknown_token_id", n)?;
        // Validated for range only: padding plays no part in encoding or decoding.
        meta.token_id("tokenizer.ggml.padding_token_id", n)?;
        let pre = meta.string("tokenizer.ggml.pre")?;

        // GGUF token i is id i. A duplicated text keeps its first id.
        let mut vocab = Vocab::default();
        for (id, tok) in self.tokens.iter().enumerate() {
            if vocab.contains_key(*tok) {
                tracing::warn!(
                    "{}: GGUF token {id} `{tok}` duplicates an earlier token; \
                     it cannot be produced by encoding",
                    meta.path.display()
                );
                continue;
            }
            vocab.insert((*tok).to_owned(), id as u32);
        }

        let unk_text = unk.map(|id| self.tokens[id as usize].to_owned());
        let mut inner = match self.kind {
            VocabKind::ByteLevelBpe => self.byte_level_bpe(vocab, unk_text, pre)?,
            VocabKind::SentencePieceBpe => self.sentencepiece_bpe(vocab, unk_text)?,
        };

        // Control and unknown tokens are special added tokens; user-defined tokens are
        // ordinary added tokens. Both are matched in the raw text before pre-tokenisation, and
        // both keep their GGUF ids because their text is in the model's vocabulary.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (tok, ty) in self.tokens.iter().zip(&self.types) {
            match *ty {
                token_type::CONTROL | token_type::UNKNOWN => {
                    special.push(AddedToken::from(*tok, true));
                }
                token_type::USER_DEFINED => {
                    user.push(AddedToken::from(*tok, false).normalized(false));
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let named = |id: u32| NamedToken {
            text: self.tokens[id as usize].to_owned(),
            id,
        };
        let bos = bos.map(named);
        let mut eos_tokens: Vec<NamedToken> = eos.map(named).into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = meta.token_id(key, n)? {
                if !eos_tokens.iter().any(|t| t.id == id) {
                    eos_tokens.push(named(id));
                }
            }
        }

        // llama.cpp's defaults when the key is absent.
        let default_add_bos = match self.kind {
            VocabKind::SentencePieceBpe => true,
            VocabKind::ByteLevelBpe => matches!(pre, Some("llama3" | "llama-bpe" | "llama-v3")),
        };
        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let bos_for_template = match (add_bos, &bos) {
            (false, _) => None,
            (true, Some(b)) => Some(b),
            (true, None) => {
                return Err(meta.err(
                    "tokenizer.ggml.add_bos_token",
                    format!("is true but `{bos_key}` is missing"),
                ))
            }
        };
        let eos_for_template = match (add_eos, eos_tokens.first()) {
            (false, _) => None,
            (true, Some(e)) => Some(e),
            (true, None) => {
                return Err(meta.err(
                    "tokenizer.ggml.add_eos_token",
                    format!("is true but `{eos_key}` is missing"),
                ))
            }
        };
        if bos_for_template.is_some() || eos_for_template.is_some() {
            let processor = template_processor(bos_for_template, eos_for_template)
                .map_err(|e| meta.err("tokenizer.ggml.add_bos_token", e))?;
            inner.with_post_processor(Some(processor));
        }

        Ok(TextTokenizer {
            inner,
            bos,
            eos: eos_tokens,
        })
    }

    /// `gpt2`: byte-level BPE, merges from `tokenizer.ggml.merges`, pre-tokenizer chosen by
    /// `tokenizer.ggml.pre`.
    fn byte_level_bpe(
        &self,
        vocab: Vocab,
        unk: Option<String>,
        pre: Option<&str>,
    ) -> Result<Tokenizer> {
        let meta = &self.meta;
        let merges_key = "tokenizer.ggml.merges";
        let merges = meta
            .string_array(merges_key)?
            .ok_or_else(|| meta.err(merges_key, "is missing (a `gpt2` vocabulary needs merges)"))?;
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        meta.err(
                            merges_key,
                            format!("entry {i} `{m}` is not of the form `a b`"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;

        let llama3 = matches!(pre, Some("llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe"));
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
        if llama3 {
            // As in HF's Llama-3 tokenizer.json: a word that is itself a token is not split.
            builder = builder.ignore_merges(true);
        }
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder
            .build()
            .map_err(|e| meta.err(merges_key, format!("does not fit the vocabulary: {e}")))?;

        let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(regex.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
            .map_err(|e| {
                ModelError::Tokenizer(format!("cannot compile the pre-tokenizer regex: {e}"))
            })
        };
        let mut tokenizer = Tokenizer::new(bpe);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            Some("smollm") => {
                PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true).into()])
                    .into()
            }
            _ if llama3 => {
                PreTokenizerSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()])
                    .into()
            }
            Some("qwen2") => {
                tokenizer.with_normalizer(Some(NFC));
                PreTokenizerSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()])
                    .into()
            }
            Some("gpt2" | "gpt-2" | "default") | None => byte_level(true).into(),
            Some(other) => {
                tracing::warn!(
                    "{}: GGUF pre-tokenizer `{other}` is not known; using the GPT-2 byte-level \
                     split, which may tokenize some text differently from the original",
                    meta.path.display()
                );
                byte_level(true).into()
            }
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
        Ok(tokenizer)
    }

    /// `llama`: SentencePiece BPE. GGUF stores scores instead of merges; the merges are derived
    /// the way HF's converter does it: every split of a token into two tokens is a merge,
    /// ranked by the merged token's score (higher first). Characters missing from the
    /// vocabulary fall back to `<0xNN>` byte tokens.
    fn sentencepiece_bpe(&self, vocab: Vocab, unk: Option<String>) -> Result<Tokenizer> {
        let meta = &self.meta;
        let scores_key = "tokenizer.ggml.scores";
        let scores = meta.float_array(scores_key)?.ok_or_else(|| {
            meta.err(scores_key, "is missing (a `llama` vocabulary needs scores)")
        })?;
        if scores.len() != self.tokens.len() {
            return Err(meta.err(
                scores_key,
                format!(
                    "has {} entries but `tokenizer.ggml.tokens` has {}",
                    scores.len(),
                    self.tokens.len()
                ),
            ));
        }
        let add_space_prefix = meta
            .bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);

        let mergeable: HashMap<&str, u32> = self
            .tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == token_type::NORMAL)
            .map(|(id, (tok, _))| (*tok, id as u32))
            .collect();
        let mut merges: Vec<(f64, u32, u32, &str, &str)> = Vec::new();
        for (id, tok) in self.tokens.iter().enumerate() {
            if self.types[id] != token_type::NORMAL {
                continue;
            }
            for (cut, _) in tok.char_indices().skip(1) {
                let (left, right) = tok.split_at(cut);
                if let (Some(l), Some(r)) = (mergeable.get(left), mergeable.get(right)) {
                    merges.push((scores[id], *l, *r, left, right));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges = merges
            .into_iter()
            .map(|(_, _, _, l, r)| (l.to_owned(), r.to_owned()))
            .collect();

        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder
            .build()
            .map_err(|e| meta.err(scores_key, format!("gives an inconsistent vocabulary: {e}")))?;

        // As HF's Llama converter with `legacy = false`: spaces become `▁`, one `▁` is
        // prepended to the start of the text (not after every special token), and the decoder
        // undoes both.
        let mut tokenizer = Tokenizer::new(bpe);
        let scheme = if add_space_prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPM_SPACE, scheme, false)));
        let replace = Replace::new(SPM_SPACE.to_string(), " ")
            .map_err(|e| ModelError::Tokenizer(format!("cannot build the decoder: {e}")))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            replace.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }
}

fn template_token(name: &str, t: &NamedToken) -> std::result::Result<TemplateToken, String> {
    TemplateToken::new(name.to_owned(), vec![t.id], vec![t.text.clone()]).map_err(|e| e.to_string())
}

/// A post-processor that adds BOS before and/or EOS after each sequence.
fn template_processor(
    bos: Option<&NamedToken>,
    eos: Option<&NamedToken>,
) -> std::result::Result<TemplateProcessing, String> {
    // Template pieces are whitespace-separated `name:type_id`; use the token's own text as
    // the piece name when it is safe to, a fixed name otherwise.
    let piece_name = |t: &NamedToken, fallback: &str| {
        let safe = !t.text.is_empty()
            && !t.text.starts_with('$')
            && !t.text.contains(':')
            && !t.text.chars().any(char::is_whitespace);
        if safe {
            t.text.clone()
        } else {
            fallback.to_owned()
        }
    };
    let mut specials = Vec::new();
    let mut single = Vec::new();
    let mut pair_a = Vec::new();
    let mut pair_b = Vec::new();
    let bos_name = bos.map(|t| piece_name(t, "BOS"));
    let eos_name = eos.map(|t| piece_name(t, "EOS"));
    if let (Some(t), Some(name)) = (bos, &bos_name) {
        specials.push(template_token(name, t)?);
        single.push(name.clone());
        pair_a.push(name.clone());
        pair_b.push(format!("{name}:1"));
    }
    single.push("$A:0".to_owned());
    pair_a.push("$A:0".to_owned());
    pair_b.push("$B:1".to_owned());
    if let (Some(t), Some(name)) = (eos, &eos_name) {
        if bos_name.as_ref() != Some(name) {
            specials.push(template_token(name, t)?);
        }
        single.push(name.clone());
        pair_a.push(name.clone());
        pair_b.push(format!("{name}:1"));
    }
    pair_a.extend(pair_b);
    TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair_a)?
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// Once this many tokens are pending and the text still ends in U+FFFD, the replacement
/// character is taken to be real (invalid bytes), not a character still being completed: a
/// UTF-8 character is at most 4 bytes, so at most 4 tokens.
const MAX_PENDING: usize = 8;

/// Incremental detokenizer: push ids one at a time, get back the text that became final.
///
/// It keeps a short window of ids: the ids of the last emitted piece (the *prefix*, context
/// that decoders such as SentencePiece's leading-space strip need) and the ids not yet emitted.
/// Each push decodes the window and emits what it adds to the prefix's text, unless that text
/// ends in U+FFFD (a multi-byte character not yet complete), in which case it waits.
/// Special tokens are skipped.
#[derive(Clone)]
pub struct StreamDecoder<'a> {
    tok: &'a TextTokenizer,
    /// Window: `ids[..read]` produced text already emitted (context only); `ids[read..]` are
    /// pending.
    ids: Vec<u32>,
    read: usize,
}

impl fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("ids", &self.ids)
            .field("read", &self.read)
            .finish()
    }
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a TextTokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Adds one id; returns the text that is now final (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tok.decode(&self.ids[..self.read], true)?;
        let full = self.tok.decode(&self.ids, true)?;
        let pending = self.ids.len() - self.read;
        let overdue = pending >= MAX_PENDING;
        if full.ends_with('\u{FFFD}') && !overdue {
            return Ok(String::new());
        }
        match suffix_after(&full, &prefix) {
            Some(new_text) => {
                let new_text = new_text.to_owned();
                self.advance();
                Ok(new_text)
            }
            None => {
                // Nothing new (e.g. skipped special tokens): keep the older context, unless the
                // window has grown too long.
                if overdue {
                    self.advance();
                }
                Ok(String::new())
            }
        }
    }

    /// The pending ids become the next prefix.
    fn advance(&mut self) {
        self.ids.drain(..self.read);
        self.read = self.ids.len();
    }

    /// Flushes whatever is pending (an incomplete character comes out as U+FFFD) and resets
    /// the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let prefix = self.tok.decode(&self.ids[..self.read], true)?;
        let full = self.tok.decode(&self.ids, true)?;
        let rest = suffix_after(&full, &prefix).unwrap_or_default().to_owned();
        self.ids.clear();
        self.read = 0;
        Ok(rest)
    }
}

/// What `full` adds after `prefix`; `None` when it adds nothing.
fn suffix_after<'s>(full: &'s str, prefix: &str) -> Option<&'s str> {
    if full.len() <= prefix.len() {
        return None;
    }
    if let Some(rest) = full.strip_prefix(prefix) {
        return Some(rest);
    }
    // A decoder rewrote the prefix's text in the longer window (rare). The prefix has been
    // emitted already; emit what lies beyond its length if that is a character boundary.
    full.get(prefix.len()..)
}
