//! Split generation in one process: the edge part, then the cloud part, token by token.
//!
//! This is the whole product flow without the network in between: the edge embeds and runs
//! layers `[0, k)` with its own KV cache, hands the layer-`k` hidden states to the cloud, which
//! runs layers `[k, n)` with its own cache and picks the next token; the edge embeds that token
//! and so on. It is what `tandem generate` runs and what the tests compare against the whole
//! model.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use tandem_protocol::{FinishReason, Sampling};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::checkpoint::{is_split_dir, Checkpoint};
use crate::error::{ModelError, Result};
use crate::kv::ContiguousKv;
use crate::layers::ForwardCtx;
use crate::manifest::{check_pair, Part};
use crate::sampling::Sampler;
use crate::split::{CloudModel, EdgeModel, LoadOptions, SplitPoint};
use crate::tokenizer::{StreamDecoder, TextTokenizer};

/// An edge part and a cloud part loaded side by side, with the tokenizer and chat template.
#[derive(Debug)]
pub struct LocalSplit {
    pub edge: EdgeModel,
    pub cloud: CloudModel,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
}

/// How to load a [`LocalSplit`].
#[derive(Clone, Debug)]
pub struct LocalSplitOptions {
    /// Split depth; required for a whole model, checked against the manifests for a split dir.
    pub edge_layers: Option<usize>,
    /// Compute dtype; `None` keeps the stored dtype (f32 for GGUF).
    pub dtype: Option<DType>,
    /// Where the cloud part computes. The edge part always runs on the CPU, as on a user's
    /// device.
    pub device: Device,
}

impl LocalSplitOptions {
    /// The edge's load options (the CPU) and the cloud's (`self.device`), both in `dtype`.
    fn load_options(&self, dtype: DType) -> (LoadOptions<'_>, LoadOptions<'_>) {
        const CPU: &Device = &Device::Cpu;
        let edge = LoadOptions { dtype, device: CPU };
        let cloud = LoadOptions {
            dtype,
            device: &self.device,
        };
        (edge, cloud)
    }
}

impl LocalSplit {
    /// Loads from a whole model (HF dir or `.gguf`, cut in memory at `edge_layers`) or from a
    /// split directory written by `tandem split` (whose manifests must pair up).
    pub fn load(path: &Path, opts: &LocalSplitOptions) -> Result<Self> {
        if is_split_dir(path) {
            let edge_ck = Checkpoint::open_part(&path.join("edge"), Part::Edge)?;
            let cloud_ck = Checkpoint::open_part(&path.join("cloud"), Part::Cloud)?;
            if let (Some(e), Some(c)) = (&edge_ck.manifest, &cloud_ck.manifest) {
                check_pair(e, c)?;
                if let Some(k) = opts.edge_layers {
                    if k != e.edge_layers {
                        return Err(ModelError::Split(format!(
                            "{} was split at {} edge layers, not {k}; split it again to change the depth",
                            path.display(),
                            e.edge_layers
                        )));
                    }
                }
            }
            let k = edge_ck.manifest.as_ref().map_or(0, |m| m.edge_layers);
            let split = SplitPoint::new(k, edge_ck.config.num_hidden_layers)?;
            // Each part in its stored dtype unless told otherwise: a light edge
            // (`--edge-dtype`) is stored differently from its cloud.
            let (on_cpu, _) = opts.load_options(opts.dtype.unwrap_or(edge_ck.stored_dtype));
            let (_, lo) = opts.load_options(opts.dtype.unwrap_or(cloud_ck.stored_dtype));
            let edge = EdgeModel::load(edge_ck.tensors.as_ref(), &edge_ck.config, split, on_cpu)?;
            let cloud = CloudModel::load(cloud_ck.tensors.as_ref(), &cloud_ck.config, split, lo)?;
            return Ok(Self {
                edge,
                cloud,
                tokenizer: cloud_ck.tokenizer,
                chat_template: cloud_ck.chat_template,
            });
        }
        let ck = Checkpoint::open(path)?;
        let k = opts.edge_layers.ok_or_else(|| {
            ModelError::Split("--edge-layers is required for a whole model".into())
        })?;
        let split = SplitPoint::new(k, ck.config.num_hidden_layers)?;
        let (on_cpu, lo) = opts.load_options(opts.dtype.unwrap_or(ck.stored_dtype));
        Ok(Self {
            edge: EdgeModel::load(ck.tensors.as_ref(), &ck.config, split, on_cpu)?,
            cloud: CloudModel::load(ck.tensors.as_ref(), &ck.config, split, lo)?,
            tokenizer: ck.tokenizer,
            chat_template: ck.chat_template,
        })
    }

    fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Tokenizer("this checkpoint has no tokenizer".into()))
    }

    /// Token ids of a prompt: the chat template applied to `system` and `user` when `chat`,
    /// otherwise the plain text with the tokenizer's special tokens (BOS) added.
    pub fn prompt_ids(&self, user: &str, system: Option<&str>, chat: bool) -> Result<Vec<u32>> {
        let tok = self.tokenizer()?;
        if !chat {
            if system.is_some() {
                return Err(ModelError::Input("--system needs --chat".into()));
            }
            return tok.encode(user, true);
        }
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate("this checkpoint has no chat template".into())
        })?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::system(s));
        }
        messages.push(ChatMessage::user(user));
        let text = template.render(&messages, true)?;
        // The template writes BOS itself where the model wants it.
        tok.encode(&text, false)
    }

    /// Runs one generation. `on_text` receives each piece of output text as soon as it is final
    /// (stop strings are never shown, not even in part).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let cfg = self.edge.config();
        if req.prompt_ids.is_empty() {
            return Err(ModelError::Input("the prompt is empty".into()));
        }
        let limit = cfg.max_position_embeddings;
        if req.prompt_ids.len() >= limit {
            return Err(ModelError::Input(format!(
                "the prompt has {} tokens; the model's context is {limit}",
                req.prompt_ids.len()
            )));
        }
        let max_new = req.max_tokens.min(limit - req.prompt_ids.len());
        let eos: Vec<u32> = req
            .eos_ids
            .clone()
            .unwrap_or_else(|| cfg.eos_token_ids.clone());
        let mut sampler = Sampler::new(req.sampling.clone());
        let n = cfg.num_hidden_layers;
        let mut edge_kv = ContiguousKv::new(n, limit);
        let mut cloud_kv = ContiguousKv::new(n, limit);
        let mut decoder = self.tokenizer.as_ref().map(StreamDecoder::new);
        let mut out = StopFilter::new(req.stop_strings.clone());

        let started = Instant::now();
        let mut output_ids: Vec<u32> = Vec::new();
        let mut finish = FinishReason::Length;
        let mut next_input: Vec<u32> = req.prompt_ids.clone();
        let mut past = 0;
        let mut first_token_s = None;
        while output_ids.len() < max_new {
            let ctx = ForwardCtx::single(past, next_input.len());
            let hidden = self.edge.forward(&next_input, &ctx, &mut edge_kv)?;
            let logits = self.cloud.forward(&hidden, &ctx, &mut cloud_kv)?;
            let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let token = sampler.sample(&row, &output_ids)?;
            first_token_s.get_or_insert_with(|| started.elapsed().as_secs_f64());
            past += next_input.len();
            if eos.contains(&token) {
                finish = FinishReason::Eos;
                break;
            }
            output_ids.push(token);
            if let Some(d) = decoder.as_mut() {
                let piece = d.push(token)?;
                if out.push(&piece, on_text) {
                    finish = FinishReason::StopString;
                    break;
                }
            }
            next_input = vec![token];
        }
        if finish != FinishReason::StopString {
            if let Some(d) = decoder.as_mut() {
                let rest = d.finish()?;
                if out.push(&rest, on_text) {
                    finish = FinishReason::StopString;
                }
            }
            out.flush(on_text);
        }
        let total = started.elapsed().as_secs_f64();
        Ok(Generation {
            prompt_ids: req.prompt_ids.clone(),
            output_ids,
            text: out.text,
            finish_reason: finish,
            time_to_first_token_s: first_token_s.unwrap_or(total),
            total_s: total,
        })
    }
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop_strings: Vec<String>,
    /// Overrides the model's eos ids when set.
    pub eos_ids: Option<Vec<u32>>,
}

/// What a generation produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub time_to_first_token_s: f64,
    pub total_s: f64,
}

/// Output text with stop strings: holds back any tail that could still become a stop string,
/// so that a stop string is never shown, not even in part.
#[derive(Clone, Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    text: String,
    shown: usize,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            text: String::new(),
            shown: 0,
        }
    }

    /// The text so far (cut before a stop string once one appeared).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends `piece`; returns true when a stop string appeared (the text is cut before it).
    pub fn push(&mut self, piece: &str, on_text: &mut dyn FnMut(&str)) -> bool {
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            self.flush(on_text);
            return true;
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut safe = self.text.len();
        for s in &self.stops {
            for cut in (1..s.len()).rev() {
                if s.is_char_boundary(cut) && self.text.ends_with(&s[..cut]) {
                    safe = safe.min(self.text.len() - cut);
                    break;
                }
            }
        }
        if safe > self.shown {
            on_text(&self.text[self.shown..safe]);
            self.shown = safe;
        }
        false
    }

    /// Shows whatever was held back (at the end of a generation).
    pub fn flush(&mut self, on_text: &mut dyn FnMut(&str)) {
        if self.text.len() > self.shown {
            on_text(&self.text[self.shown..]);
            self.shown = self.text.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let mut out = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = String::new();
        let mut stopped = false;
        for p in pieces {
            if out.push(p, &mut |s| shown.push_str(s)) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.flush(&mut |s| shown.push_str(s));
        }
        (out.text, shown, stopped)
    }

    #[test]
    fn stop_string_across_pieces_is_never_shown() {
        let (text, shown, stopped) = feed(&["\nUser:"], &["Paris", ".\n", "Us", "er:", " more"]);
        assert!(stopped);
        assert_eq!(text, "Paris.");
        assert_eq!(shown, "Paris.");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_diverges() {
        let (text, shown, stopped) = feed(&["END"], &["the E", "ND", "x"]);
        assert!(stopped);
        assert_eq!(text, "the ");
        assert_eq!(shown, "the ");
        let (text, shown, stopped) = feed(&["END"], &["the E", "asy way"]);
        assert!(!stopped);
        assert_eq!(text, "the Easy way");
        assert_eq!(shown, text);
    }
}
