"""Drives tandem-edge's OpenAI-compatible endpoint with the official `openai` package.

Run by openai_sdk.rs with one JSON argument (base_url, api_key, model, template,
max_tokens, completion_prompt); prints one JSON object with what the SDK returned, which the
Rust side checks against `tandem-edge run` and the client library. Nothing here reaches
beyond the loopback endpoint (max_retries=0: a failure shows at once).
"""

import json
import sys

import openai


def chat(client, cfg, **kwargs):
    return client.chat.completions.create(
        model=cfg["model"],
        messages=[{"role": "user", "content": cfg["template"]}],
        max_tokens=cfg["max_tokens"],
        **kwargs,
    )


def main():
    cfg = json.loads(sys.argv[1])
    client = openai.OpenAI(
        base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=600
    )
    out = {"openai_version": openai.__version__}

    raw = client.chat.completions.with_raw_response.create(
        model=cfg["model"],
        messages=[{"role": "user", "content": cfg["template"]}],
        max_tokens=cfg["max_tokens"],
        temperature=0,
        user="sdk-test",
    )
    whole = raw.parse()
    out["whole"] = {
        "type": type(whole).__name__,
        "id": whole.id,
        "record_id": raw.headers.get("x-tandem-transparency-id"),
        "content": whole.choices[0].message.content,
        "role": whole.choices[0].message.role,
        "finish_reason": whole.choices[0].finish_reason,
        "usage": whole.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    }

    texts, reasons, ids, usage, chunk_types = [], [], set(), None, set()
    for chunk in chat(client, cfg, temperature=0, stream=True, stream_options={"include_usage": True}):
        chunk_types.add(type(chunk).__name__)
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    out["stream"] = {
        "text": "".join(texts),
        "deltas": len(texts),
        "finish_reasons": reasons,
        "ids": sorted(ids),
        "usage": usage,
        "chunk_types": sorted(chunk_types),
    }

    errors = {}
    refused = {
        "n": {"n": 2},
        "tools": {"tools": [{"type": "function", "function": {"name": "lookup"}}]},
        "response_format": {"response_format": {"type": "json_object"}},
        "logprobs": {"logprobs": True},
    }
    for name, kwargs in refused.items():
        try:
            chat(client, cfg, **kwargs)
            errors[name] = {"class": None}
        except openai.APIStatusError as e:
            errors[name] = {
                "class": type(e).__name__,
                "is_bad_request": isinstance(e, openai.BadRequestError),
                "status": e.status_code,
                "param": e.param,
                "code": e.code,
                "type": e.type,
            }
    out["errors"] = errors

    out["models"] = [m.id for m in client.models.list()]

    comp = client.completions.create(
        model=cfg["model"], prompt=cfg["completion_prompt"], max_tokens=5, temperature=0
    )
    out["completion"] = {
        "type": type(comp).__name__,
        "text": comp.choices[0].text,
        "usage": comp.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
