//! Tokenizer and chat-template behaviour.
//!
//! Most tests build tiny GGUF files here (a byte-level BPE vocabulary and a SentencePiece one),
//! so they need no network and run in milliseconds. The `demo_*` tests check the real
//! SmolLM2-135M-Instruct GGUF against known facts about its HF tokenizer; they look for it at
//! `$TANDEM_DEMO_GGUF` or `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf`, and skip when it
//! is absent unless `TANDEM_REQUIRE_DEMO=1`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::tokenizer::{StreamDecoder, TextTokenizer};
use tandem_model::ModelError;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte → printable-character map.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

/// ChatML, as in SmolLM2's GGUF but without the default system prompt.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String((*s).to_owned())).collect())
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

/// Writes a GGUF with only metadata and reads its header back.
fn write_gguf(path: &Path, meta: &[(String, Value)]) -> Result<Content> {
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &refs, &[])?;
    drop(f);
    let mut f = std::fs::File::open(path)?;
    Ok(Content::read(&mut f)?)
}

/// Metadata of a tiny byte-level BPE vocabulary: 3 control tokens, the 256 byte characters,
/// merged tokens for "hello", " world" and the first two bytes of "日", and a user-defined
/// `<tool>` token.
fn byte_level_meta() -> Vec<(String, Value)> {
    let bc = byte_chars();
    let ch = |b: u8| bc[b as usize].to_string();
    let cjk_head = format!("{}{}", ch(0xE6), ch(0x97)); // "日" is E6 97 A5
    let merges: Vec<(String, String)> = vec![
        ("h".into(), "e".into()),
        ("l".into(), "l".into()),
        ("he".into(), "ll".into()),
        ("hell".into(), "o".into()),
        ("Ġ".into(), "w".into()),
        ("o".into(), "r".into()),
        ("Ġw".into(), "or".into()),
        ("l".into(), "d".into()),
        ("Ġwor".into(), "ld".into()),
        (ch(0xE6), ch(0x97)),
    ];
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i32, 3, 3];
    for c in &bc {
        tokens.push(c.to_string());
        types.push(1);
    }
    for (a, b) in &merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    debug_assert!(tokens.contains(&cjk_head));
    tokens.push("<tool>".into());
    types.push(4);
    let merge_strs: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    vec![
        ("general.architecture".into(), s("llama")),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merge_strs.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(CHATML)),
    ]
}

fn set(meta: &mut Vec<(String, Value)>, key: &str, value: Option<Value>) {
    meta.retain(|(k, _)| k != key);
    if let Some(v) = value {
        meta.push((key.to_owned(), v));
    }
}

fn byte_level_tokenizer(dir: &Path) -> Result<TextTokenizer> {
    let path = dir.join("tiny.gguf");
    let content = write_gguf(&path, &byte_level_meta())?;
    Ok(TextTokenizer::from_gguf(&content, &path)?)
}

fn pieces(tok: &TextTokenizer, ids: &[u32]) -> Result<Vec<String>> {
    ids.iter()
        .map(|&id| {
            tok.id_to_token(id)
                .with_context(|| format!("no token {id}"))
        })
        .collect()
}

/// Pushes `ids` through a stream decoder; returns the pieces (the last one from `finish`).
fn stream(tok: &TextTokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut dec = StreamDecoder::new(tok);
    let mut out = Vec::new();
    for &id in ids {
        out.push(dec.push(id)?);
    }
    out.push(dec.finish()?);
    Ok(out)
}

const SAMPLES: &[&str] = &[
    "hello world",
    "Hello, World! 2024",
    "café crème",
    "日本語のテキスト",
    "emoji 🦀🎉 mixed",
    "tabs\tand\nnewlines\r\n  double  spaces ",
    "",
    " leading space",
];

// ---------------------------------------------------------------------------------------------
// Byte-level BPE from GGUF
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_byte_level_encodes_with_merges_and_round_trips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tok = byte_level_tokenizer(dir.path())?;
    assert_eq!(tok.vocab_size(), 3 + 256 + 10 + 1);

    let ids = tok.encode("hello world", false)?;
    assert_eq!(pieces(&tok, &ids)?, ["hello", "Ġworld"]);
    // The `smollm` pre-tokenizer splits digits one by one (no merges among them here anyway,
    // but "12" must not be a single pre-token joined with the letters around it).
    let ids = tok.encode("a12", false)?;
    assert_eq!(pieces(&tok, &ids)?, ["a", "1", "2"]);

    for text in SAMPLES {
        let ids = tok.encode(text, false)?;
        assert_eq!(&tok.decode(&ids, true)?, text, "round trip of {text:?}");
    }
    Ok(())
}

#[test]
fn gguf_control_tokens_are_single_special_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tok = byte_level_tokenizer(dir.path())?;
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(
        tok.bos_token().map(|t| (t.text.as_str(), t.id)),
        Some(("<|im_start|>", 1))
    );
    assert_eq!(tok.eos_token_ids(), [2]);

    let text = "<|im_start|>user\nhello<|im_end|>\n";
    let ids = tok.encode(text, false)?;
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    assert!(tok.is_special(1) && tok.is_special(2) && !tok.is_special(ids[1]));
    assert_eq!(tok.decode(&ids, false)?, text);
    assert_eq!(tok.decode(&ids, true)?, "user\nhello\n");

    // A user-defined token is one id too, but not special: decoding keeps it.
    let tool = tok.token_to_id("<tool>").context("<tool>")?;
    let ids = tok.encode("x<tool>y", false)?;
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[1], tool);
    assert!(!tok.is_special(tool));
    assert_eq!(tok.decode(&ids, true)?, "x<tool>y");

    // add_bos_token is false: special tokens add nothing.
    assert_eq!(tok.encode("hello", true)?, tok.encode("hello", false)?);
    Ok(())
}

#[test]
fn gguf_add_bos_token_prepends_bos_only_with_special_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bos.gguf");
    let mut meta = byte_level_meta();
    set(
        &mut meta,
        "tokenizer.ggml.add_bos_token",
        Some(Value::Bool(true)),
    );
    let tok = TextTokenizer::from_gguf(&write_gguf(&path, &meta)?, &path)?;
    let plain = tok.encode("hello world", false)?;
    let with = tok.encode("hello world", true)?;
    assert_eq!(with.first(), Some(&1));
    assert_eq!(&with[1..], plain.as_slice());
    assert_ne!(plain.first(), Some(&1));
    assert_eq!(tok.decode(&with, true)?, "hello world");

    // The post-processor survives save → from_file.
    let json = dir.path().join("tokenizer.json");
    tok.save(&json)?;
    assert_eq!(
        TextTokenizer::from_file(&json)?.encode("hello world", true)?,
        with
    );
    Ok(())
}

#[test]
fn save_then_from_file_gives_identical_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tok = byte_level_tokenizer(dir.path())?;
    let json = dir.path().join("tokenizer.json");
    tok.save(&json)?;
    let loaded = TextTokenizer::from_file(&json)?;
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    let mut texts: Vec<&str> = SAMPLES.to_vec();
    texts.push("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<tool><|im_end|>");
    for text in texts {
        let a = tok.encode(text, true)?;
        let b = loaded.encode(text, true)?;
        assert_eq!(a, b, "ids of {text:?}");
        assert_eq!(loaded.decode(&b, false)?, tok.decode(&a, false)?);
    }
    // No tokenizer_config.json next to it: BOS/EOS are unknown.
    assert!(loaded.bos_token().is_none());

    // With one, BOS/EOS come from it.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}"#,
    )?;
    let loaded = TextTokenizer::from_file(&json)?;
    assert_eq!(loaded.bos_token().map(|t| t.id), Some(1));
    assert_eq!(loaded.eos_token_ids(), [2]);
    Ok(())
}

#[test]
fn from_file_errors_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.json");
    match TextTokenizer::from_file(&missing) {
        Err(e @ ModelError::Io { .. }) => assert!(e.to_string().contains("missing.json")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"model\": 3}")?;
    match TextTokenizer::from_file(&bad) {
        Err(e @ ModelError::Format { .. }) => assert!(e.to_string().contains("bad.json")),
        other => panic!("expected a format error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn stream_decoder_holds_split_characters_and_matches_full_decode() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tok = byte_level_tokenizer(dir.path())?;

    // "日" is two tokens here: its first two bytes merged, then the last byte.
    let ids = tok.encode("日", false)?;
    assert_eq!(ids.len(), 2);
    let mut dec = StreamDecoder::new(&tok);
    assert_eq!(dec.push(ids[0])?, "");
    assert_eq!(dec.push(ids[1])?, "日");
    assert_eq!(dec.finish()?, "");

    let text = "<|im_start|>hello 日本 café 🦀 world<|im_end|>";
    let ids = tok.encode(text, false)?;
    let out = stream(&tok, &ids)?;
    for piece in &out {
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} has U+FFFD");
    }
    assert_eq!(out.concat(), tok.decode(&ids, true)?);
    assert_eq!(out.concat(), "hello 日本 café 🦀 world");
    // The crab (4 bytes, 4 tokens) arrives in one piece.
    assert!(out.iter().any(|p| p.contains('🦀')));

    // An incomplete character at the very end is flushed by finish, as U+FFFD.
    let mut dec = StreamDecoder::new(&tok);
    assert_eq!(dec.push(ids_of(&tok, "日")?[0])?, "");
    assert_eq!(dec.finish()?, "\u{FFFD}");
    Ok(())
}

fn ids_of(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false)?)
}

#[test]
fn gguf_metadata_errors_name_key_and_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("broken.gguf");
    let check = |meta: Vec<(String, Value)>, needles: &[&str]| -> Result<()> {
        let content = write_gguf(&path, &meta)?;
        let err = match TextTokenizer::from_gguf(&content, &path) {
            Ok(_) => anyhow::bail!("expected an error mentioning {needles:?}"),
            Err(e) => e,
        };
        ensure!(
            matches!(err, ModelError::Tokenizer(_)),
            "wrong variant: {err:?}"
        );
        let msg = err.to_string();
        ensure!(msg.contains("broken.gguf"), "no path in {msg}");
        for n in needles {
            ensure!(msg.contains(n), "{n:?} not in {msg}");
        }
        Ok(())
    };

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.model", Some(s("bert")));
    check(m, &["tokenizer.ggml.model", "bert", "not supported"])?;

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.tokens", None);
    check(m, &["tokenizer.ggml.tokens", "missing"])?;

    let mut m = byte_level_meta();
    set(
        &mut m,
        "tokenizer.ggml.token_type",
        Some(Value::Array(vec![Value::I32(1)])),
    );
    check(m, &["tokenizer.ggml.token_type", "entries"])?;

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.merges", Some(strings(&["x yz"])));
    check(m, &["tokenizer.ggml.merges"])?;

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.merges", None);
    check(m, &["tokenizer.ggml.merges", "missing"])?;

    let mut m = byte_level_meta();
    set(
        &mut m,
        "tokenizer.ggml.eos_token_id",
        Some(Value::U32(1_000_000)),
    );
    check(m, &["tokenizer.ggml.eos_token_id", "1000000"])?;

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.bos_token_id", Some(s("one")));
    check(m, &["tokenizer.ggml.bos_token_id", "integer"])?;

    let mut m = byte_level_meta();
    set(&mut m, "tokenizer.ggml.bos_token_id", None);
    set(
        &mut m,
        "tokenizer.ggml.add_bos_token",
        Some(Value::Bool(true)),
    );
    check(
        m,
        &[
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id",
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE (`llama`) from GGUF
// ---------------------------------------------------------------------------------------------

fn sentencepiece_meta() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32, 0., 0.];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.);
    }
    for c in ["▁", "h", "e", "l", "o", "w", "r", "d"] {
        tokens.push(c.into());
        types.push(1);
        scores.push(-100.);
    }
    // Earlier pieces have higher scores, so they merge first.
    let merged = [
        "he", "ll", "or", "ld", "▁w", "hell", "hello", "▁wor", "▁world", "▁hello",
    ];
    for (i, p) in merged.iter().enumerate() {
        tokens.push((*p).into());
        types.push(1);
        scores.push(-(i as f32) - 1.);
    }
    vec![
        ("tokenizer.ggml.model".into(), s("llama")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
    ]
}

#[test]
fn gguf_sentencepiece_merges_byte_fallback_and_bos() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("spm.gguf");
    let tok = TextTokenizer::from_gguf(&write_gguf(&path, &sentencepiece_meta())?, &path)?;

    // add_bos_token is absent: SentencePiece models default to adding BOS.
    let ids = tok.encode("hello world", true)?;
    assert_eq!(pieces(&tok, &ids)?, ["<s>", "▁hello", "▁world"]);
    assert_eq!(tok.decode(&ids, true)?, "hello world");
    assert_eq!(tok.decode(&ids, false)?, "<s> hello world");

    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let ids = tok.encode("日", false)?;
    assert_eq!(pieces(&tok, &ids)?, ["▁", "<0xE6>", "<0x97>", "<0xA5>"]);
    for text in ["hello world", "日本 hello", "hello  world", "wörld\nhello"] {
        let ids = tok.encode(text, false)?;
        assert_eq!(tok.decode(&ids, true)?, text, "round trip of {text:?}");
        // Streaming keeps the spaces the leading-space strip would lose on a lone token.
        let out = stream(&tok, &ids)?;
        assert_eq!(out.concat(), text, "stream of {text:?}: {out:?}");
        assert!(out.iter().all(|p| !p.contains('\u{FFFD}')));
    }

    // Round trip through tokenizer.json.
    let json = dir.path().join("tokenizer.json");
    tok.save(&json)?;
    let loaded = TextTokenizer::from_file(&json)?;
    assert_eq!(
        loaded.encode("hello 日本 world", true)?,
        tok.encode("hello 日本 world", true)?
    );
    Ok(())
}

#[test]
fn gguf_sentencepiece_without_scores_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("spm.gguf");
    let mut meta = sentencepiece_meta();
    set(&mut meta, "tokenizer.ggml.scores", None);
    let err = TextTokenizer::from_gguf(&write_gguf(&path, &meta)?, &path)
        .err()
        .context("expected an error")?;
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.ggml.scores") && msg.contains("spm.gguf"),
        "{msg}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

fn system_user() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("What is the capital of France?"),
    ]
}

const CHATML_EXPECTED: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn chat_template_from_tiny_gguf_renders_chatml_and_tokenizes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny.gguf");
    let content = write_gguf(&path, &byte_level_meta())?;
    let tmpl = ChatTemplate::from_gguf(&content)?.context("template expected")?;
    assert_eq!(tmpl.source(), CHATML);
    assert_eq!(tmpl.bos_token(), Some("<|im_start|>"));
    assert_eq!(tmpl.eos_token(), Some("<|im_end|>"));

    let text = tmpl.render(&system_user(), true)?;
    assert_eq!(text, CHATML_EXPECTED);
    let without = tmpl.render(&system_user(), false)?;
    assert_eq!(format!("{without}<|im_start|>assistant\n"), text);

    let tok = TextTokenizer::from_gguf(&content, &path)?;
    let ids = tok.encode(&text, false)?;
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);

    let mut meta = byte_level_meta();
    set(&mut meta, "tokenizer.chat_template", None);
    assert!(ChatTemplate::from_gguf(&write_gguf(&path, &meta)?)?.is_none());
    Ok(())
}

/// A Llama-3-style template: BOS, `.strip()`, and `raise_exception` on an unknown role.
const LLAMA3_STYLE: &str = "{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'].strip() + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
";

#[test]
fn llama3_style_template_strips_and_raises() -> Result<()> {
    let tmpl = ChatTemplate::new(
        LLAMA3_STYLE,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )?;
    let msgs = vec![
        ChatMessage::system("  Be brief.\n"),
        ChatMessage::user("Hi there"),
        ChatMessage::assistant("Hello!"),
        ChatMessage::user("\tBye "),
    ];
    assert_eq!(
        tmpl.render(&msgs, true)?,
        "<|begin_of_text|>\
         <|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    let err = tmpl
        .render(&[ChatMessage::new("tool", "{}")], false)
        .err()
        .context("raise_exception must fail the render")?;
    assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
    assert!(err.to_string().contains("Unknown role: tool"), "{err}");
    Ok(())
}

#[test]
fn template_environment_matches_transformers() -> Result<()> {
    // Python methods via pycompat, no HTML escaping, namespace() and loop variables.
    let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}\
               {% if m.content.startswith('<') %}{{ m.role.upper() }}:{{ m.content }}{% endif %}\
               {% if loop.last %}|{{ ns.n }}{% endif %}{% endfor %}\
               {% for k, v in {'a': 1}.items() %}|{{ k }}={{ v }}{% endfor %}";
    let tmpl = ChatTemplate::new(src, None, None)?;
    let out = tmpl.render(
        &[
            ChatMessage::user("<b>&'x'</b>"),
            ChatMessage::assistant("plain"),
        ],
        false,
    )?;
    assert_eq!(out, "USER:<b>&'x'</b>|2|a=1");

    // trim_blocks and lstrip_blocks, as transformers sets them: block tags leave no blank
    // lines or indentation behind. A single newline ending the source is dropped (Jinja2's
    // default); newlines the template prints are kept.
    let tmpl = ChatTemplate::new(
        "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}\n",
        None,
        None,
    )?;
    let msgs = [
        ChatMessage::user("a"),
        ChatMessage::assistant("b"),
        ChatMessage::user("c"),
    ];
    assert_eq!(tmpl.render(&msgs, false)?, "a\nc\n");
    let tmpl = ChatTemplate::new("{{ 'x\\n' }}{{ 'y' }}\n", None, None)?;
    assert_eq!(tmpl.render(&[], false)?, "x\ny");

    // Unknown bos/eos render as empty strings, not "none".
    let tmpl = ChatTemplate::new("[{{ bos_token }}][{{ eos_token }}]", None, None)?;
    assert_eq!(tmpl.render(&[], false)?, "[][]");

    // strftime_now gives today's date.
    let tmpl = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", None, None)?;
    let date = tmpl.render(&[], false)?;
    let parts: Vec<&str> = date.split('-').collect();
    assert_eq!(parts.len(), 3, "{date}");
    assert!(parts[0].parse::<u32>()? >= 2025, "{date}");
    assert!((1..=12).contains(&parts[1].parse::<u32>()?), "{date}");
    assert!((1..=31).contains(&parts[2].parse::<u32>()?), "{date}");

    // Syntax errors are caught when the template is created.
    let err = ChatTemplate::new("{% for m in messages %}", None, None)
        .err()
        .context("unclosed for must not compile")?;
    assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
    Ok(())
}

#[test]
fn tokenizer_config_forms() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("tokenizer_config.json");

    // No file, no chat_template.jinja: no template.
    assert!(ChatTemplate::from_tokenizer_config(&cfg)?.is_none());

    // String template, object-form BOS.
    let json = serde_json::json!({
        "chat_template": CHATML,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true},
        "eos_token": "</s>",
    });
    std::fs::write(&cfg, json.to_string())?;
    let t = ChatTemplate::from_tokenizer_config(&cfg)?.context("template")?;
    assert_eq!((t.bos_token(), t.eos_token()), (Some("<s>"), Some("</s>")));
    assert_eq!(t.render(&system_user(), true)?, CHATML_EXPECTED);

    // List of named templates: "default" is taken.
    let json = serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ eos_token }}"},
        ],
        "eos_token": "</s>",
    });
    std::fs::write(&cfg, json.to_string())?;
    let t = ChatTemplate::from_tokenizer_config(&cfg)?.context("template")?;
    assert_eq!(t.render(&[], false)?, "DEFAULT </s>");

    // A list without "default" is an error naming the file and the choices.
    let json = serde_json::json!({"chat_template": [{"name": "rag", "template": "R"}]});
    std::fs::write(&cfg, json.to_string())?;
    let msg = ChatTemplate::from_tokenizer_config(&cfg)
        .err()
        .context("no default must be an error")?
        .to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("rag"),
        "{msg}"
    );

    // No chat_template key: chat_template.jinja next to it is used.
    std::fs::write(&cfg, r#"{"eos_token": "</s>"}"#)?;
    assert!(ChatTemplate::from_tokenizer_config(&cfg)?.is_none());
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n")?;
    let t = ChatTemplate::from_tokenizer_config(&cfg)?.context("template")?;
    assert_eq!(t.render(&[], false)?, "J</s>");

    // Malformed JSON and a template that does not compile are errors naming the file.
    std::fs::write(&cfg, "{not json")?;
    let err = ChatTemplate::from_tokenizer_config(&cfg)
        .err()
        .context("bad json")?;
    assert!(matches!(err, ModelError::Format { .. }), "{err:?}");
    std::fs::write(&cfg, r#"{"chat_template": "{% if %}"}"#)?;
    let msg = ChatTemplate::from_tokenizer_config(&cfg)
        .err()
        .context("bad template")?
        .to_string();
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 GGUF
// ---------------------------------------------------------------------------------------------

fn demo_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("TANDEM_DEMO_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("TANDEM_REQUIRE_DEMO").as_deref() != Ok("1"),
        "TANDEM_REQUIRE_DEMO=1 but the demo model is missing at {}",
        path.display()
    );
    eprintln!("skipping: demo model not found at {}", path.display());
    None
}

fn demo_content(path: &Path) -> Result<Content> {
    let mut f = std::fs::File::open(path)?;
    Ok(Content::read(&mut f)?)
}

#[test]
fn demo_tokenizer_matches_hf_smollm2() -> Result<()> {
    let Some(path) = demo_gguf() else {
        return Ok(());
    };
    let content = demo_content(&path)?;
    let tok = TextTokenizer::from_gguf(&content, &path)?;
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_token().map(|t| t.id), Some(1));
    assert_eq!(tok.eos_token_ids(), [2]);

    let ids = tok.encode("Hello world", false)?;
    assert_eq!(pieces(&tok, &ids)?, ["Hello", "Ġworld"]);
    assert_eq!(ids, [19556, 905]);
    let ids = tok.encode("2024", false)?;
    assert_eq!(pieces(&tok, &ids)?, ["2", "0", "2", "4"]);
    // add_bos_token is false in this GGUF.
    assert_eq!(
        tok.encode("Hello world", true)?,
        tok.encode("Hello world", false)?
    );

    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>\n", false)?;
    assert_eq!(chat.first(), Some(&1));
    assert!(chat.contains(&2));

    for text in SAMPLES {
        let ids = tok.encode(text, false)?;
        assert_eq!(&tok.decode(&ids, true)?, text, "round trip of {text:?}");
        let out = stream(&tok, &ids)?;
        assert_eq!(&out.concat(), text, "stream of {text:?}");
        assert!(out.iter().all(|p| !p.contains('\u{FFFD}')), "{out:?}");
    }

    let dir = tempfile::tempdir()?;
    let json = dir.path().join("tokenizer.json");
    tok.save(&json)?;
    let loaded = TextTokenizer::from_file(&json)?;
    for text in SAMPLES {
        assert_eq!(loaded.encode(text, true)?, tok.encode(text, true)?);
    }
    Ok(())
}

#[test]
fn demo_chat_template_renders_chatml() -> Result<()> {
    let Some(path) = demo_gguf() else {
        return Ok(());
    };
    let content = demo_content(&path)?;
    let tmpl = ChatTemplate::from_gguf(&content)?.context("SmolLM2 has a template")?;
    assert_eq!(tmpl.render(&system_user(), true)?, CHATML_EXPECTED);
    // Without a system message the template adds its own.
    assert_eq!(
        tmpl.render(&[ChatMessage::user("Hi")], true)?,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    Ok(())
}
