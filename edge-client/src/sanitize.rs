//! The sanitizer: redacts personal identifiers from profile values before they enter a prompt.
//!
//! A [`Sanitizer`] is an ordered list of [`Rule`]s. Each rule is a regular expression, a
//! literal replacement and an optional [`Check`] that a match must pass to be redacted (the
//! Luhn checksum for card numbers, a digit count for phone numbers), so that ordinary numbers,
//! dates and prices are left alone. Rules run one after the other over the output of the
//! previous one; the default replacements contain no digits and no `@`, so a later rule never
//! re-matches an earlier rule's replacement.
//!
//! The built-in rules ([`Sanitizer::default`]), in order:
//!
//! | name | redacts |
//! |---|---|
//! | `email` | e-mail addresses |
//! | `payment_card` | 13–19 digit numbers, optionally grouped by spaces or dashes, that pass the Luhn check |
//! | `us_ssn` | US social security numbers written `123-45-6789` |
//! | `national_id` | a value introduced by an id label (`passport no: X1234567`, `ID number 12 345 678`); only the value is replaced |
//! | `phone` | `+`-prefixed international numbers, North-American numbers, and trunk-prefixed national numbers (`030 1234 5678`, `06 12 34 56 78`) with 9–15 digits |
//!
//! Why `national_id` keys on the label: national identifiers have hundreds of formats (9
//! digits, letters and digits, with check characters or not) that are indistinguishable from
//! order numbers, postcodes or product codes by their shape alone. What people and forms
//! almost always do is name them ("passport", "SSN", "national id", "tax id", "DNI", "BSN",
//! "Aadhaar", …), so the rule redacts the value after such a label and keeps the label,
//! which stays readable for the model ("passport no: [redacted id]"). Fixed-format ids with a
//! distinctive shape (like the US SSN) get their own rule.
//!
//! The rules are configurable with [`SanitizerConfig`] (serde; JSON or TOML): turn built-in
//! rules off, add rules, or replace a built-in rule by adding one with the same name.
//!
//! # Invariants
//! - A [`Redaction`] names the field, the rule and how many matches were replaced; it never
//!   holds the redacted text.
//! - A rule whose pattern has a capture group named `value` replaces only that group.
//! - Replacements are literal (`$1` is not expanded), so a configured replacement cannot copy
//!   the secret into the output.
//!
//! # Costs
//! One regex pass per rule per string (linear in the string's length; the `regex` crate never
//! backtracks). The Luhn search inside one match tries at most 6 windows per digit group (a
//! window holds at most 19 digits in groups of at least 3).

use std::collections::BTreeMap;
use std::ops::Range;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::PromptError;

/// The capture group that, when a pattern has it, is the only part of a match replaced.
pub const VALUE_GROUP: &str = "value";

/// A further test a regex match must pass to be redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Payment cards: inside the match, every run of whole digit groups (each of at least 3
    /// digits) holding 13–19 digits in all that passes the Luhn checksum is redacted
    /// (overlapping runs merged); the other digits in the match are kept.
    Luhn,
    /// The match holds between `min` and `max` digits (inclusive).
    Digits { min: usize, max: usize },
}

/// One redaction rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Name shown in [`Redaction::rule`] and used to disable or replace the rule.
    pub name: String,
    pub pattern: Regex,
    /// Literal text put in place of each redacted match.
    pub replacement: String,
    pub check: Option<Check>,
}

impl Rule {
    /// A rule from a pattern's source. Fails when the pattern does not compile, can match the
    /// empty string, or the name is empty.
    pub fn new(
        name: impl Into<String>,
        pattern: &str,
        replacement: impl Into<String>,
        check: Option<Check>,
    ) -> Result<Self, PromptError> {
        let name = name.into();
        let bad = |reason: String| PromptError::Rule {
            name: name.clone(),
            reason,
        };
        if name.trim().is_empty() {
            return Err(bad("a rule needs a name".into()));
        }
        let pattern = Regex::new(pattern).map_err(|e| bad(e.to_string()))?;
        if pattern.is_match("") {
            return Err(bad("the pattern matches the empty string".into()));
        }
        if let Some(Check::Digits { min, max }) = check {
            if min > max {
                return Err(bad(format!("digit check has min {min} > max {max}")));
            }
        }
        Ok(Self {
            name,
            pattern,
            replacement: replacement.into(),
            check,
        })
    }

    /// Applies the rule: the new text and how many matches were replaced.
    pub fn apply(&self, text: &str) -> (String, usize) {
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for caps in self.pattern.captures_iter(text) {
            let Some(m) = caps.name(VALUE_GROUP).or_else(|| caps.get(0)) else {
                continue;
            };
            if m.is_empty() {
                continue;
            }
            match self.check {
                None => ranges.push(m.range()),
                Some(Check::Digits { min, max }) => {
                    let digits = m.as_str().chars().filter(char::is_ascii_digit).count();
                    if (min..=max).contains(&digits) {
                        ranges.push(m.range());
                    }
                }
                Some(Check::Luhn) => ranges.extend(
                    luhn_spans(m.as_str())
                        .into_iter()
                        .map(|r| r.start + m.start()..r.end + m.start()),
                ),
            }
        }
        if ranges.is_empty() {
            return (text.to_owned(), 0);
        }
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for r in &ranges {
            out.push_str(&text[last..r.start]);
            out.push_str(&self.replacement);
            last = r.end;
        }
        out.push_str(&text[last..]);
        (out, ranges.len())
    }
}

/// What the sanitizer did to one field: `count` matches of `rule` were replaced. Holds no
/// part of the redacted text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    pub field: String,
    pub rule: String,
    pub count: usize,
}

/// A rule as written in configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// A `regex` crate pattern; a group named `value` limits the replacement to that group.
    pub pattern: String,
    /// Defaults to `[redacted <name>]`.
    #[serde(default)]
    pub replacement: Option<String>,
    #[serde(default)]
    pub check: Option<Check>,
}

/// Sanitizer configuration, e.g. in TOML:
///
/// ```toml
/// disable = ["national_id"]
/// [[rules]]
/// name = "member_number"
/// pattern = "\\bM-\\d{6}\\b"
/// replacement = "[member no.]"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SanitizerConfig {
    /// Start from the built-in rules (default `true`).
    pub defaults: bool,
    /// Built-in rules to switch off, by name. Naming a rule that does not exist is an error,
    /// so a typo cannot leave a rule on that the user meant to turn off (or the reverse).
    pub disable: Vec<String>,
    /// More rules, run after the built-in ones; one named like a built-in rule takes its place.
    pub rules: Vec<RuleConfig>,
}

impl Default for SanitizerConfig {
    fn default() -> Self {
        Self {
            defaults: true,
            disable: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// An ordered list of redaction rules. See the module doc.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "SanitizerConfig")]
pub struct Sanitizer {
    rules: Vec<Rule>,
}

impl Default for Sanitizer {
    /// The built-in rules.
    fn default() -> Self {
        Self {
            rules: default_rules(),
        }
    }
}

impl TryFrom<SanitizerConfig> for Sanitizer {
    type Error = PromptError;

    fn try_from(cfg: SanitizerConfig) -> Result<Self, PromptError> {
        Self::from_config(&cfg)
    }
}

impl Sanitizer {
    /// A sanitizer with exactly these rules, run in this order.
    pub fn new(rules: Vec<Rule>) -> Result<Self, PromptError> {
        for (i, r) in rules.iter().enumerate() {
            if rules[..i].iter().any(|o| o.name == r.name) {
                return Err(PromptError::Rule {
                    name: r.name.clone(),
                    reason: "two rules have this name".into(),
                });
            }
        }
        Ok(Self { rules })
    }

    /// A sanitizer that redacts nothing.
    pub fn none() -> Self {
        Self { rules: Vec::new() }
    }

    /// Builds the rules a configuration describes.
    pub fn from_config(cfg: &SanitizerConfig) -> Result<Self, PromptError> {
        let mut rules = if cfg.defaults {
            default_rules()
        } else {
            Vec::new()
        };
        for name in &cfg.disable {
            let before = rules.len();
            rules.retain(|r| &r.name != name);
            if rules.len() == before {
                return Err(PromptError::UnknownRule(name.clone()));
            }
        }
        for rc in &cfg.rules {
            let replacement = rc
                .replacement
                .clone()
                .unwrap_or_else(|| format!("[redacted {}]", rc.name));
            let rule = Rule::new(rc.name.clone(), &rc.pattern, replacement, rc.check)?;
            match rules.iter_mut().find(|r| r.name == rule.name) {
                Some(slot) => *slot = rule,
                None => rules.push(rule),
            }
        }
        Self::new(rules)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Sanitizes one string value of `field`: the redacted text and one [`Redaction`] per rule
    /// that replaced something.
    pub fn sanitize(&self, field: &str, value: &str) -> (String, Vec<Redaction>) {
        let mut counts = Counts::default();
        let out = self.apply_all(value, &mut counts);
        (out, counts.into_redactions(field, &self.rules))
    }

    /// Sanitizes a JSON value of `field`: every string inside it (array items, object values
    /// and object keys, at any depth) and every number (a phone or card number stored as a
    /// JSON number is as private as one stored as a string; a number that had something
    /// redacted becomes a string). Counts are summed over the whole value under `field`.
    pub fn sanitize_json(
        &self,
        field: &str,
        value: &serde_json::Value,
    ) -> (serde_json::Value, Vec<Redaction>) {
        let mut counts = Counts::default();
        let out = self.walk(value, &mut counts);
        (out, counts.into_redactions(field, &self.rules))
    }

    fn walk(&self, value: &serde_json::Value, counts: &mut Counts) -> serde_json::Value {
        use serde_json::Value as J;
        match value {
            J::String(s) => J::String(self.apply_all(s, counts)),
            J::Number(n) => {
                let text = n.to_string();
                let out = self.apply_all(&text, counts);
                if out == text {
                    value.clone()
                } else {
                    J::String(out)
                }
            }
            J::Array(items) => J::Array(items.iter().map(|v| self.walk(v, counts)).collect()),
            J::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let base = self.apply_all(k, counts);
                    // Two keys redacted to the same text must not overwrite each other.
                    let mut key = base.clone();
                    let mut n = 2;
                    while out.contains_key(&key) {
                        key = format!("{base} ({n})");
                        n += 1;
                    }
                    out.insert(key, self.walk(v, counts));
                }
                J::Object(out)
            }
            J::Null | J::Bool(_) => value.clone(),
        }
    }

    fn apply_all(&self, text: &str, counts: &mut Counts) -> String {
        let mut cur = text.to_owned();
        for (i, rule) in self.rules.iter().enumerate() {
            let (next, n) = rule.apply(&cur);
            if n > 0 {
                *counts.0.entry(i).or_default() += n;
                cur = next;
            }
        }
        cur
    }
}

/// Matches per rule index.
#[derive(Default)]
struct Counts(BTreeMap<usize, usize>);

impl Counts {
    fn into_redactions(self, field: &str, rules: &[Rule]) -> Vec<Redaction> {
        self.0
            .into_iter()
            .map(|(i, count)| Redaction {
                field: field.to_owned(),
                rule: rules[i].name.clone(),
                count,
            })
            .collect()
    }
}

/// The built-in rules (see the module doc for why each looks the way it does).
fn default_rules() -> Vec<Rule> {
    // Labels people and forms put before a national identifier (case-insensitive).
    const ID_LABEL: &str = concat!(
        r"(?i:\b(?:ssn|social security(?: number| no)?|passport(?: number| no)?",
        r"|national id(?:entity)?(?: card)?(?: number| no)?|id(?: card)?(?: number| no)",
        r"|identity (?:card|number)|tax id(?: number)?|nino|national insurance(?: number| no)?",
        r"|dni|nif|bsn|pesel|cpr|aadhaar|personalausweis(?:nummer)?))",
    );
    // The value after the label: alphanumeric groups holding a digit (`X1234567`,
    // `12.345.678-9`), optionally led by up to 3 letters and closed by 1–2 letters
    // (`AB 12 34 56 C`).
    const ID_VALUE: &str = concat!(
        r"(?P<value>(?:[A-Za-z]{1,3}[ -]?)?[A-Za-z0-9]*\d[A-Za-z0-9]*",
        r"(?:[ ./-](?:[A-Za-z0-9]*\d[A-Za-z0-9]*|[A-Za-z]{1,2}\b))*)",
    );
    let table: [(&str, String, &str, Option<Check>); 5] = [
        (
            "email",
            r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b".into(),
            "[redacted email]",
            None,
        ),
        (
            "payment_card",
            // Any run of digit groups; the Luhn check picks out the card inside it.
            r"\b\d+(?:[ -]\d+)*\b".into(),
            "[redacted card number]",
            Some(Check::Luhn),
        ),
        (
            "us_ssn",
            r"\b\d{3}-\d{2}-\d{4}\b".into(),
            "[redacted id]",
            None,
        ),
        (
            "national_id",
            format!(r"{ID_LABEL}\b\.?\s*(?:[:#=]|\b(?i:is)\b)?\s*{ID_VALUE}"),
            "[redacted id]",
            Some(Check::Digits { min: 4, max: 30 }),
        ),
        (
            "phone",
            concat!(
                // International: +CC then groups, optionally a (area) group.
                r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6}\b",
                // North America: (415) 555-0132, 415-555-0132, 415.555.0132, 4155550132.
                r"|(?:\b1[ .-]?)?(?:\(\d{3}\)[ .-]?|\b\d{3}[ .-]?)\d{3}[ .-]?\d{4}\b",
                // Trunk-prefixed national numbers: 030 1234 5678, 06 12 34 56 78, 07700 900123.
                r"|\b0\d{1,4}(?:[ /.-]?\d{2,5}){1,4}\b",
            )
            .into(),
            "[redacted phone]",
            Some(Check::Digits { min: 9, max: 15 }),
        ),
    ];
    table
        .into_iter()
        .map(|(name, pattern, replacement, check)| {
            Rule::new(name, &pattern, replacement, check)
                .unwrap_or_else(|e| panic!("built-in sanitizer rule does not compile: {e}"))
        })
        .collect()
}

/// Byte ranges inside `s` that hold a payment card: every window of whole digit groups, each
/// of at least 3 digits (cards are written contiguous or in groups of 4–6), holding 13–19 digits
/// in all and passing the Luhn check. Overlapping windows are merged: when a number next to a
/// card happens to pass the check together with part of the card, redacting a few digits too
/// many is better than leaving some of the card.
fn luhn_spans(s: &str) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (i, c) in s.char_indices() {
        if c.is_ascii_digit() {
            match groups.last_mut() {
                Some(g) if g.end == i => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
    }
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for i in 0..groups.len() {
        let mut digits = 0;
        for j in i..groups.len() {
            if groups[j].len() < 3 {
                break;
            }
            digits += groups[j].len();
            if digits > 19 {
                break;
            }
            let window = groups[i..=j].iter().flat_map(|g| s[g.clone()].bytes());
            if digits >= 13 && luhn_valid(window) {
                match merged.last_mut() {
                    Some(last) if i <= last.1 => last.1 = last.1.max(j),
                    _ => merged.push((i, j)),
                }
            }
        }
    }
    merged
        .into_iter()
        .map(|(i, j)| groups[i].start..groups[j].end)
        .collect()
}

/// The Luhn (mod 10) checksum over ASCII digits.
fn luhn_valid(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111111111111111".bytes()));
        assert!(luhn_valid("79927398713".bytes()));
        assert!(!luhn_valid("4111111111111112".bytes()));
    }

    #[test]
    fn luhn_spans_skip_surrounding_groups() {
        let s = "12 34 4111 1111 1111 1111 99";
        let spans = luhn_spans(s);
        assert_eq!(spans.len(), 1);
        assert_eq!(&s[spans[0].clone()], "4111 1111 1111 1111");
    }

    #[test]
    fn default_rules_compile() {
        assert_eq!(
            Sanitizer::default()
                .rules()
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["email", "payment_card", "us_ssn", "national_id", "phone"]
        );
    }
}
