//! Request checking: an OpenAI request body becomes a [`ValidRequest`] or an [`ApiError`]
//! naming the parameter at fault. The rest of the endpoint only sees valid requests.
//!
//! Rules (see docs/edge-apps.md for the table):
//! - Implemented: `model` (must be the one this endpoint serves: 404 `model_not_found`
//!   otherwise), `messages` (roles `system`, `developer`, `user`, `assistant`; content a
//!   string or text parts) or `prompt` (one string), `max_tokens` / `max_completion_tokens`
//!   (the latter wins), `temperature` (OpenAI's default 1; 0 is greedy), `top_p`, `seed`
//!   (drawn at random when absent), `stop` (a string or up to 4), `stream`,
//!   `stream_options.include_usage`, `user` (kept in the local transparency entry only).
//! - Accepted only at their neutral value, otherwise 400 `unsupported_parameter`: `n` (1),
//!   `tools` / `functions` (empty), `tool_choice` (`none`), `response_format` (`text`),
//!   `logprobs` (false / null), `top_logprobs`, `presence_penalty` and `frequency_penalty`
//!   (0), `logit_bias` (empty), `echo` (false), `suffix`, `best_of` (1), `modalities`
//!   (`["text"]`).
//! - Ignored (they change nothing here): `parallel_tool_calls`, `store`, `metadata`,
//!   `service_tier`, `prompt_cache_key`, `safety_identifier`,
//!   `stream_options.include_obfuscation`.
//! - Anything else: 400 `unrecognized_parameter`, as OpenAI answers unknown arguments.
//!
//! A JSON `null` counts as absent, as in OpenAI's API.

use serde_json::{Map, Value};
use tandem_protocol::SamplingParams;

use super::api::ApiError;
use crate::conversation::{Role, Turn};

/// Most stop strings per request (OpenAI's limit; the protocol allows more).
const MAX_STOP: usize = 4;
/// Longest stop string in bytes (the protocol's limit).
const MAX_STOP_BYTES: usize = 256;

/// Which route a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Chat,
    Completions,
}

/// What to generate from.
#[derive(Clone, Debug)]
pub(crate) enum Input {
    /// `/v1/chat/completions`: turns for the chat template.
    Chat(Vec<Turn>),
    /// `/v1/completions`: a raw prompt template (no chat template, no system prompt).
    Text(String),
}

/// A checked request.
#[derive(Clone, Debug)]
pub(crate) struct ValidRequest {
    pub input: Input,
    pub sampling: SamplingParams,
    /// `None`: the endpoint's default (capped by the context left after the prompt).
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Checks `body` for `route`; `model_id` is the one model served.
pub(crate) fn parse(route: Route, body: Value, model_id: &str) -> Result<ValidRequest, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let mut p = Params(map);
    let model = p
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "you must provide a model parameter"))?;
    if model != model_id {
        return Err(ApiError::not_found(
            format!("the model `{model}` does not exist; this endpoint serves `{model_id}`"),
            "model_not_found",
        ));
    }
    let input = match route {
        Route::Chat => Input::Chat(messages(&mut p)?),
        Route::Completions => Input::Text(prompt(&mut p)?),
    };
    neutral_only(&mut p, route)?;
    let max_tokens = match (
        p.positive("max_completion_tokens")?,
        p.positive("max_tokens")?,
    ) {
        (Some(n), _) | (None, Some(n)) => Some(n),
        (None, None) => None,
    };
    let sampling = sampling(&mut p)?;
    let stop = stop(&mut p)?;
    let stream = p.bool("stream")?.unwrap_or(false);
    let include_usage = stream_options(&mut p, stream)?;
    let user = p.string("user")?;
    for ignored in [
        "parallel_tool_calls",
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    ] {
        p.take(ignored);
    }
    p.finish()?;
    Ok(ValidRequest {
        input,
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
        user,
    })
}

fn messages(p: &mut Params) -> Result<Vec<Turn>, ApiError> {
    let Some(value) = p.take("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "you must provide a messages parameter",
        ));
    };
    let Value::Array(items) = value else {
        return Err(ApiError::invalid("messages", "messages must be an array"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| message(i, item))
        .collect()
}

fn message(i: usize, item: Value) -> Result<Turn, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(mut m) = item else {
        return Err(ApiError::invalid(
            format!("messages[{i}]"),
            "each message must be an object",
        ));
    };
    let role = match m.remove("role") {
        Some(Value::String(r)) => r,
        _ => {
            return Err(ApiError::invalid(
                at("role"),
                "a message needs a string role",
            ))
        }
    };
    let role = match role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(ApiError::unsupported(
                &at("role"),
                &format!("the message role `{other}` (tools are not supported)"),
            ))
        }
    };
    for key in ["tool_calls", "function_call", "audio"] {
        if m.get(key).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(&at(key), key));
        }
    }
    let content = match m.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(&at("content"), parts)?,
        _ => {
            return Err(ApiError::invalid(
                at("content"),
                "a message needs content: a string or an array of text parts",
            ))
        }
    };
    Ok(Turn { role, content })
}

/// Concatenates `[{"type": "text", "text": …}, …]`; any other part type is unsupported.
fn text_parts(param: &str, parts: Vec<Value>) -> Result<String, ApiError> {
    let mut out = String::new();
    for part in parts {
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(text))) => out.push_str(text),
            (Some(kind), _) if kind != "text" => {
                return Err(ApiError::unsupported(
                    param,
                    &format!("content of type `{kind}`"),
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    param,
                    "a text part needs a string `text`",
                ))
            }
        }
    }
    Ok(out)
}

fn prompt(p: &mut Params) -> Result<String, ApiError> {
    match p.take("prompt") {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(mut items)) if items.len() == 1 && items[0].is_string() => {
            Ok(items.remove(0).as_str().unwrap_or_default().to_owned())
        }
        Some(Value::Array(items)) if items.len() > 1 => Err(ApiError::unsupported(
            "prompt",
            "more than one prompt per request",
        )),
        None => Err(ApiError::invalid("prompt", "you must provide a prompt")),
        Some(_) => Err(ApiError::unsupported(
            "prompt",
            "a prompt given as token ids (give it as a string)",
        )),
    }
}

/// Parameters that are fine only at their neutral value.
fn neutral_only(p: &mut Params, route: Route) -> Result<(), ApiError> {
    if let Some(n) = p.integer("n")? {
        if n != 1 {
            return Err(ApiError::unsupported("n", "n other than 1"));
        }
    }
    for key in ["tools", "functions"] {
        match p.take(key) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => return Err(ApiError::unsupported(key, "tool calling")),
        }
    }
    match p.take("tool_choice") {
        None => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(_) => return Err(ApiError::unsupported("tool_choice", "tool calling")),
    }
    if p.take("function_call").is_some() {
        return Err(ApiError::unsupported("function_call", "tool calling"));
    }
    match p.take("response_format") {
        None => {}
        Some(v) if v.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(_) => {
            return Err(ApiError::unsupported(
                "response_format",
                "a response_format other than text",
            ))
        }
    }
    match (route, p.take("logprobs")) {
        (_, None) | (Route::Chat, Some(Value::Bool(false))) => {}
        _ => return Err(ApiError::unsupported("logprobs", "logprobs")),
    }
    if p.take("top_logprobs").is_some() {
        return Err(ApiError::unsupported("top_logprobs", "logprobs"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if p.number(key)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::unsupported(key, key));
        }
    }
    match p.take("logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => return Err(ApiError::unsupported("logit_bias", "logit_bias")),
    }
    if p.bool("echo")? == Some(true) {
        return Err(ApiError::unsupported("echo", "echo"));
    }
    if p.take("suffix").is_some() {
        return Err(ApiError::unsupported("suffix", "suffix"));
    }
    if p.integer("best_of")?.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("best_of", "best_of other than 1"));
    }
    match p.take("modalities") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(|m| m.as_str() == Some("text")) => {}
        Some(_) => {
            return Err(ApiError::unsupported(
                "modalities",
                "output other than text",
            ))
        }
    }
    for key in ["audio", "prediction", "web_search_options"] {
        if p.take(key).is_some() {
            return Err(ApiError::unsupported(key, key));
        }
    }
    Ok(())
}

fn sampling(p: &mut Params) -> Result<SamplingParams, ApiError> {
    let temperature = p.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = p.number("top_p")?;
    if top_p.is_some_and(|x| !(x > 0.0 && x <= 1.0)) {
        return Err(ApiError::invalid(
            "top_p",
            "top_p must be greater than 0 and at most 1",
        ));
    }
    // Two's complement keeps every int64 seed distinct and deterministic.
    let seed = match p.integer("seed")? {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p.map(|x| x as f32),
        seed,
        ..SamplingParams::default()
    })
}

fn stop(p: &mut Params) -> Result<Vec<String>, ApiError> {
    let stops = match p.take("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid(
                    "stop",
                    "stop must be a string or strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stops.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop sequences"),
        ));
    }
    if stops
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            "stop",
            format!("each stop sequence must have 1 to {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(stops)
}

/// `stream_options.include_usage`; the options are only allowed with `stream: true`.
fn stream_options(p: &mut Params, stream: bool) -> Result<bool, ApiError> {
    let Some(value) = p.take("stream_options") else {
        return Ok(false);
    };
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let Value::Object(mut opts) = value else {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options must be an object",
        ));
    };
    let include_usage = match opts.remove("include_usage") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options.include_usage",
                "include_usage must be a boolean",
            ))
        }
    };
    opts.remove("include_obfuscation");
    if let Some(key) = opts.keys().next() {
        return Err(ApiError::invalid(
            format!("stream_options.{key}"),
            format!("unrecognized stream option `{key}`"),
        )
        .with_code("unrecognized_parameter"));
    }
    Ok(include_usage)
}

/// The request's top-level parameters, taken out one by one; what is left is unknown.
struct Params(Map<String, Value>);

impl Params {
    /// The value of `key`; `null` counts as absent.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(key, format!("{key} must be a string"))),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ApiError::invalid(key, format!("{key} must be a boolean"))),
        }
    }

    fn number(&mut self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a number"))),
        }
    }

    fn integer(&mut self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("{key} must be an integer"))),
        }
    }

    /// An integer in `1..=u32::MAX`.
    fn positive(&mut self, key: &str) -> Result<Option<u32>, ApiError> {
        match self.integer(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|&n| n >= 1)
                .map(Some)
                .ok_or_else(|| ApiError::invalid(key, format!("{key} must be at least 1"))),
        }
    }

    /// Fails on the first parameter nobody took.
    fn finish(self) -> Result<(), ApiError> {
        match self.0.into_iter().find(|(_, v)| !v.is_null()) {
            None => Ok(()),
            Some((key, _)) => Err(ApiError::invalid(
                key.clone(),
                format!("unrecognized request argument supplied: {key}"),
            )
            .with_code("unrecognized_parameter")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chat(extra: Value) -> Result<ValidRequest, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        parse(Route::Chat, body, "m")
    }

    #[test]
    fn openai_defaults_and_precedence() -> Result<(), ApiError> {
        let r = chat(json!({}))?;
        assert_eq!(r.sampling.temperature, 1.0, "OpenAI's default temperature");
        assert_eq!(
            (r.max_tokens, r.stream, r.include_usage),
            (None, false, false)
        );
        let r = chat(
            json!({"max_tokens": 9, "max_completion_tokens": 5, "seed": -1,
                            "temperature": 0, "top_p": 0.5, "stop": "END"}),
        )?;
        assert_eq!(r.max_tokens, Some(5), "max_completion_tokens wins");
        assert_eq!(r.sampling.seed, u64::MAX, "int64 seeds map one to one");
        assert_eq!((r.sampling.temperature, r.sampling.top_p), (0.0, Some(0.5)));
        assert_eq!(r.stop, ["END"]);
        // null is absent, as in OpenAI's API; ignored parameters are accepted.
        let r = chat(json!({"n": null, "tools": null, "store": true, "metadata": {"a": "b"}}))?;
        assert!(r.user.is_none());
        Ok(())
    }

    #[test]
    fn absent_seeds_are_drawn_and_given_seeds_kept() -> Result<(), ApiError> {
        let seeds: Vec<u64> = (0..4)
            .map(|_| chat(json!({})).map(|r| r.sampling.seed))
            .collect::<Result<_, _>>()?;
        assert!(seeds.windows(2).any(|w| w[0] != w[1]), "{seeds:?}");
        assert_eq!(chat(json!({"seed": 42}))?.sampling.seed, 42);
        Ok(())
    }

    #[test]
    fn text_parts_join_and_roles_map() -> Result<(), ApiError> {
        let r = chat(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "name": "bot"},
        ]}))?;
        let Input::Chat(turns) = r.input else {
            panic!("chat input");
        };
        let got: Vec<(Role, &str)> = turns.iter().map(|t| (t.role, t.content.as_str())).collect();
        assert_eq!(
            got,
            [
                (Role::System, "be brief"),
                (Role::User, "ab"),
                (Role::Assistant, "c")
            ]
        );
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
        let e = chat(image).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        Ok(())
    }

    #[test]
    fn completions_take_one_string_prompt() {
        let parse_prompt = |p: Value| {
            parse(Route::Completions, json!({"model": "m", "prompt": p}), "m").map(|r| r.input)
        };
        assert!(matches!(parse_prompt(json!(["x"])), Ok(Input::Text(t)) if t == "x"));
        for bad in [json!(["x", "y"]), json!([1, 2]), json!(3)] {
            let e = parse_prompt(bad).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some("prompt"));
        }
        let e = parse(
            Route::Completions,
            json!({"model": "m", "prompt": "x", "echo": true}),
            "m",
        )
        .expect_err("echo");
        assert_eq!(e.param.as_deref(), Some("echo"));
    }
}
