//! Streaming detokenization: [`StreamDecoder`] turns generated ids, one at a time, into the
//! text pieces that have become final (never half a UTF-8 character).

use std::fmt;

use super::TextTokenizer;
use crate::error::Result;

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
