//! The audit's prompts and the generic text its learned attacker trains on.
//!
//! A prompt is one line of text in which `[[` and `]]` mark the sensitive spans (names,
//! e-mail addresses, postal addresses, dates of birth, phone numbers). The built-in set is
//! made up (no real person); `--prompts FILE` adds one prompt per non-empty line in the same
//! markup. A token is sensitive when its text overlaps a marked span (so `" Maria"` counts).
//!
//! The generic training text is unrelated to the prompts: the learned decoder must not see
//! the names it is asked to recover.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tandem_model::tokenizer::TextTokenizer;

/// The built-in prompts: (name, marked text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "birthday-card",
        "Write a short birthday card for [[Maria Gonzalez]], born on [[14 March 1987]], who \
         lives at [[22 Baker Street, Leeds LS1 4AP]].",
    ),
    (
        "insurance-claim",
        "My name is [[Thomas Whitfield]] and my policy number is [[PX-4471-9920]]. Please \
         draft a claim letter about the water damage in my flat.",
    ),
    (
        "email-reply",
        "Reply politely to [[priya.raman@example.com]] and tell [[Priya]] that the meeting on \
         Friday has moved to 3 pm.",
    ),
    (
        "doctor-visit",
        "I am [[Jonas Berg]], date of birth [[2 November 1954]]. Summarise what I should ask my \
         doctor about my blood pressure medication.",
    ),
    (
        "delivery",
        "Send the parcel to [[Amelia Clarke]], [[41 Rue des Lilas, 75011 Paris]], phone \
         [[+33 6 12 34 56 78]], before the end of the month.",
    ),
    (
        "gift-ideas",
        "Suggest three gifts for [[Kenji Watanabe]] who turns 40 on [[8 July]] and likes \
         hiking, jazz and Japanese whisky.",
    ),
    (
        "bank",
        "Explain why the bank blocked the card ending in [[4821]] that belongs to [[Sofia \
         Marquez]], e-mail [[sofia.mq@example.org]].",
    ),
    (
        "school",
        "Write a note to the teacher saying that [[Liam O'Connor]], who lives at [[7 Elm \
         Grove, Cork]], will miss school on Monday.",
    ),
];

/// Generic text for training the learned attacker: no names, no addresses.
pub const GENERIC_TEXT: &str = "The weather today is mild with a light wind from the west, \
and the afternoon should stay dry. Many people enjoy walking in the park when the leaves \
turn yellow and red. A good recipe for bread needs flour, water, salt and yeast, and the \
dough should rest for at least an hour before baking. Please summarise the main points of \
the report and list any open questions for the next meeting. The train to the city leaves \
every twenty minutes on weekdays and every hour on Sundays. Write a short poem about the \
sea, the sky and the sound of rain on the roof. Computers store numbers in binary, and a \
byte holds eight bits. The committee agreed to review the budget next month and to publish \
the minutes on the website. Could you recommend a book about the history of music for a \
beginner? Regular exercise, enough sleep and a balanced diet help people stay healthy. \
The museum opens at ten in the morning and closes at six in the evening, except on public \
holidays. Thank you for your message; I will answer your questions in detail tomorrow. \
The children built a small boat from wood and painted it blue before taking it to the lake. \
Explain the difference between a virus and a bacterium in simple words. The price of \
coffee rose again this year because of a poor harvest. Translate the following sentence \
into French and keep the tone friendly. A modern kitchen often has an oven, a fridge, a \
dishwasher and plenty of cupboards. The team will present the new design to the customer \
on Thursday and collect feedback afterwards.";

/// Requests the device answered before the audited prompts: the output-pairs attacker
/// ([`crate::pairs`]) learns from the rows of the tokens generated after them. Generic on
/// purpose: no names, addresses or numbers of the audited prompts.
pub const EARLIER_REQUESTS: &[&str] = &[
    "Write a short story about a lighthouse keeper and a storm.",
    "Give me five tips for keeping houseplants alive in winter.",
    "Explain how a bicycle gear system works.",
    "Draft a polite e-mail asking a colleague to review a document.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Summarise the plot of a classic detective novel in a few sentences.",
    "Describe a healthy breakfast and why it is good for you.",
    "Write a product description for a waterproof backpack.",
    "How do I prepare for a job interview at a software company?",
    "Tell me about the history of the printing press.",
    "Write a friendly reminder to a neighbour about a community meeting.",
    "List the steps to bake a simple chocolate cake.",
    "Explain what a mortgage is to someone buying their first home.",
    "Compose a short thank-you note for a birthday present.",
    "What are good ways to learn a new language as an adult?",
    "Describe a day at the seaside for a children's book.",
];

/// One tokenized prompt with its sensitive positions.
#[derive(Clone, Debug, Serialize)]
pub struct AuditPrompt {
    pub name: String,
    /// Token ids, the BOS token first when the tokenizer has one.
    #[serde(skip)]
    pub ids: Vec<u32>,
    /// `sensitive[i]`: token `i` overlaps a marked span.
    #[serde(skip)]
    pub sensitive: Vec<bool>,
    /// Whether `ids[0]` is a BOS token the attacker knows.
    #[serde(skip)]
    pub starts_with_bos: bool,
}

impl AuditPrompt {
    /// Builds a prompt from already tokenized parts (tests and callers without a tokenizer).
    pub fn from_ids(name: &str, ids: Vec<u32>, sensitive: Vec<bool>, bos: bool) -> Self {
        Self {
            name: name.to_owned(),
            ids,
            sensitive,
            starts_with_bos: bos,
        }
    }

    /// Positions the attack is scored on (all but a known BOS).
    pub fn scored(&self) -> std::ops::Range<usize> {
        usize::from(self.starts_with_bos)..self.ids.len()
    }
}

/// Splits `[[…]]` markup into plain text and the byte ranges of the marked spans.
pub fn parse_marked(marked: &str) -> Result<(String, Vec<std::ops::Range<usize>>)> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut rest = marked;
    while let Some(open) = rest.find("[[") {
        text.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("]]")
            .context("a `[[` without its `]]` in a prompt")?;
        let start = text.len();
        text.push_str(&after[..close]);
        spans.push(start..text.len());
        rest = &after[close + 2..];
    }
    if rest.contains("]]") {
        bail!("a `]]` without its `[[` in a prompt");
    }
    text.push_str(rest);
    Ok((text, spans))
}

/// Tokenizes a marked prompt.
pub fn tokenize(tok: &TextTokenizer, name: &str, marked: &str) -> Result<AuditPrompt> {
    let (text, spans) = parse_marked(marked)?;
    let enc = tok
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing prompt {name}: {e}"))?;
    let mut ids = Vec::new();
    let mut sensitive = Vec::new();
    let bos = tok.bos_token().map(|b| b.id);
    if let Some(b) = bos {
        ids.push(b);
        sensitive.push(false);
    }
    for (&id, &(a, b)) in enc.get_ids().iter().zip(enc.get_offsets()) {
        ids.push(id);
        sensitive.push(spans.iter().any(|s| a < s.end && s.start < b));
    }
    if !spans.is_empty() && !sensitive.iter().any(|&s| s) {
        bail!("prompt {name}: the tokenizer gives no offsets inside the marked spans");
    }
    Ok(AuditPrompt {
        name: name.to_owned(),
        ids,
        sensitive,
        starts_with_bos: bos.is_some(),
    })
}

/// The built-in prompts plus those of `file` (one per non-empty line).
pub fn load(tok: &TextTokenizer, file: Option<&std::path::Path>) -> Result<Vec<AuditPrompt>> {
    let mut out = BUILTIN
        .iter()
        .map(|(name, text)| tokenize(tok, name, text))
        .collect::<Result<Vec<_>>>()?;
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            out.push(tokenize(tok, &format!("file-{}", i + 1), line.trim())?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_parsed() {
        let (text, spans) = parse_marked("Hi [[Ann Lee]], born [[1 May]].").expect("ok");
        assert_eq!(text, "Hi Ann Lee, born 1 May.");
        assert_eq!(&text[spans[0].clone()], "Ann Lee");
        assert_eq!(&text[spans[1].clone()], "1 May");
        assert!(parse_marked("a [[b").is_err());
        assert!(parse_marked("a ]] b").is_err());
        for (_, p) in BUILTIN {
            let (_, spans) = parse_marked(p).expect("built-in prompt parses");
            assert!(!spans.is_empty());
        }
    }
}
