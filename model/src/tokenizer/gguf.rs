//! Rebuilding a tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file: byte-level BPE
//! (`gpt2`) vocabularies with their merges and pre-tokenizer, and SentencePiece BPE (`llama`)
//! vocabularies, whose merges are derived from the scores. GGUF token `i` keeps id `i`, and
//! control and user-defined tokens become added tokens with their GGUF ids (see the invariants
//! of the parent module).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
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

use super::meta::Meta;
use super::{NamedToken, TextTokenizer};
use crate::error::{ModelError, Result};

/// The Llama-3 pre-tokenizer regex (also used by llama.cpp for `llama-bpe` and `smaug-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer regex: like Llama-3's, but digits are split one by one.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The SentencePiece word-boundary marker.
const SPM_SPACE: char = '▁';

/// The metadata key of the BOS token id.
const BOS_KEY: &str = "tokenizer.ggml.bos_token_id";
/// The metadata key of the EOS token id.
const EOS_KEY: &str = "tokenizer.ggml.eos_token_id";

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// The vocabulary family named by `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VocabKind {
    /// `gpt2`: byte-level BPE with merges.
    ByteLevelBpe,
    /// `llama`: SentencePiece BPE with scores and `<0xNN>` byte fallback.
    SentencePieceBpe,
}

pub(super) struct GgufTokenizerBuilder<'a> {
    meta: Meta<'a>,
    kind: VocabKind,
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl<'a> GgufTokenizerBuilder<'a> {
    pub(super) fn new(content: &'a Content, path: &'a Path) -> Result<Self> {
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

    pub(super) fn build(self) -> Result<TextTokenizer> {
        let n = self.tokens.len();
        let meta = &self.meta;
        let bos = meta.token_id(BOS_KEY, n)?;
        let eos = meta.token_id(EOS_KEY, n)?;
        let unk = meta.token_id("tokenizer.ggml.unknown_token_id", n)?;
        // Validated for range only: padding plays no part in encoding or decoding.
        meta.token_id("tokenizer.ggml.padding_token_id", n)?;
        let pre = meta.string("tokenizer.ggml.pre")?;

        let vocab = self.vocab();
        let unk_text = unk.map(|id| self.tokens[id as usize].to_owned());
        let mut inner = match self.kind {
            VocabKind::ByteLevelBpe => self.byte_level_bpe(vocab, unk_text, pre)?,
            VocabKind::SentencePieceBpe => self.sentencepiece_bpe(vocab, unk_text)?,
        };
        self.add_marked_tokens(&mut inner);

        let bos = bos.map(|id| self.named(id));
        let eos_tokens = self.eos_tokens(eos)?;
        if let Some(processor) = self.post_processor(pre, bos.as_ref(), &eos_tokens)? {
            inner.with_post_processor(Some(processor));
        }

        Ok(TextTokenizer {
            inner,
            bos,
            eos: eos_tokens,
        })
    }

    /// Token `id` with its GGUF text (`id` is in range: checked by `Meta::token_id`).
    fn named(&self, id: u32) -> NamedToken {
        NamedToken {
            text: self.tokens[id as usize].to_owned(),
            id,
        }
    }

    /// The vocabulary: GGUF token i is id i. A duplicated text keeps its first id.
    fn vocab(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (id, tok) in self.tokens.iter().enumerate() {
            if vocab.contains_key(*tok) {
                tracing::warn!(
                    "{}: GGUF token {id} `{tok}` duplicates an earlier token; \
                     it cannot be produced by encoding",
                    self.meta.path.display()
                );
                continue;
            }
            vocab.insert((*tok).to_owned(), id as u32);
        }
        vocab
    }

    /// Adds the tokens the GGUF token types mark. Control and unknown tokens are special added
    /// tokens; user-defined tokens are ordinary added tokens. Both are matched in the raw text
    /// before pre-tokenisation, and both keep their GGUF ids because their text is in the
    /// model's vocabulary.
    fn add_marked_tokens(&self, inner: &mut Tokenizer) {
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
    }

    /// The EOS tokens: the GGUF EOS first, then the end-of-turn and end-of-message tokens
    /// that differ from those before them.
    fn eos_tokens(&self, eos: Option<u32>) -> Result<Vec<NamedToken>> {
        let n = self.tokens.len();
        let mut eos_tokens: Vec<NamedToken> = eos.map(|id| self.named(id)).into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = self.meta.token_id(key, n)? {
                if !eos_tokens.iter().any(|t| t.id == id) {
                    eos_tokens.push(self.named(id));
                }
            }
        }
        Ok(eos_tokens)
    }

    /// The post-processor that adds BOS and/or EOS, when the metadata (or llama.cpp's default
    /// for the vocabulary) asks for either; `None` when it asks for neither.
    fn post_processor(
        &self,
        pre: Option<&str>,
        bos: Option<&NamedToken>,
        eos_tokens: &[NamedToken],
    ) -> Result<Option<TemplateProcessing>> {
        let meta = &self.meta;
        // llama.cpp's defaults when the key is absent.
        let default_add_bos = match self.kind {
            VocabKind::SentencePieceBpe => true,
            VocabKind::ByteLevelBpe => matches!(pre, Some("llama3" | "llama-bpe" | "llama-v3")),
        };
        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let bos_for_template = match (add_bos, bos) {
            (false, _) => None,
            (true, Some(b)) => Some(b),
            (true, None) => {
                return Err(meta.err(
                    "tokenizer.ggml.add_bos_token",
                    format!("is true but `{BOS_KEY}` is missing"),
                ))
            }
        };
        let eos_for_template = match (add_eos, eos_tokens.first()) {
            (false, _) => None,
            (true, Some(e)) => Some(e),
            (true, None) => {
                return Err(meta.err(
                    "tokenizer.ggml.add_eos_token",
                    format!("is true but `{EOS_KEY}` is missing"),
                ))
            }
        };
        if bos_for_template.is_none() && eos_for_template.is_none() {
            return Ok(None);
        }
        template_processor(bos_for_template, eos_for_template)
            .map(Some)
            .map_err(|e| meta.err("tokenizer.ggml.add_bos_token", e))
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
