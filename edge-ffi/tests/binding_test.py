"""Drives the device library through its generated Python binding (UniFFI), against a live
server. Run by tests/python_binding.rs, which passes the settings in the environment and
compares nothing itself: this script asserts and exits non-zero on the first failure."""

import json
import os
import sys
import threading

sys.path.insert(0, os.environ["TANDEM_BINDING_DIR"])
import tandem_edge_ffi as tandem  # noqa: E402  (the generated module)

edge_dir = os.environ["TANDEM_EDGE_DIR"]
server = os.environ["TANDEM_SERVER_URL"]
prompt = os.environ["TANDEM_PROMPT"]
expected = os.environ["TANDEM_EXPECTED_TEXT"]
expected_ids = json.loads(os.environ["TANDEM_EXPECTED_IDS"])
max_tokens = int(os.environ["TANDEM_MAX_TOKENS"])


class Collect(tandem.TextListener):
    def __init__(self):
        self.parts = []
        self.threads = set()

    def on_text(self, delta):
        self.parts.append(delta)
        self.threads.add(threading.get_ident())


edge = tandem.TandemEdge.open(edge_dir, server)
model = edge.model()
assert model.edge_layers == 1 and model.num_layers > 1, model
assert tandem.library_version()

edge.set_profile_json(json.dumps({"city": "Paris", "email": "jane.doe@example.com"}))
assert sorted(edge.profile_fields()) == ["city", "email"], edge.profile_fields()

opts = tandem.default_options()
opts.max_tokens = max_tokens
listener = Collect()
done = edge.generate(prompt, opts, listener)
assert done.token_ids == expected_ids, (done.token_ids, expected_ids)
assert done.text == expected, (done.text, expected)
assert "".join(listener.parts) == done.text, (listener.parts, done.text)
assert threading.get_ident() not in listener.threads, "callbacks ran on the caller's thread"
assert done.finish_reason == "length", done.finish_reason
assert done.output_tokens == max_tokens and done.prompt_tokens > 0, done
record = json.loads(done.transparency_json)
assert record, "no transparency record"
# The profile's values never appear in the record's account of what left the device.
assert "jane.doe@example.com" not in done.transparency_json

# A template field the profile lacks is refused before anything is sent.
try:
    edge.generate("Hello {{ missing_field }}", opts, None)
    raise AssertionError("a missing profile field was accepted")
except tandem.EdgeError.Prompt as e:
    assert "missing_field" in str(e), e

# In the background, then cancelled: the generation ends, as cancelled or (when the server
# was faster) at its length, and a second wait is an error.
long = tandem.default_options()
long.max_tokens = 200
handle = edge.start(prompt, long, None)
handle.cancel()
result = handle.wait()
assert result.finish_reason in ("cancelled", "length"), result.finish_reason
assert result.output_tokens <= 200
try:
    handle.wait()
    raise AssertionError("a second wait succeeded")
except tandem.EdgeError.Generation:
    pass

# A server that is not there fails with a clear error, not a hang.
dead = tandem.TandemEdge.open_with(edge_dir, "ws://127.0.0.1:9/v1/edge/ws", 0)
# A fresh object starts with an empty profile.
assert dead.profile_fields() == [], dead.profile_fields()
dead.set_profile_json(json.dumps({"city": "Paris"}))
try:
    dead.generate(prompt, opts, None)
    raise AssertionError("generation against a closed port succeeded")
except tandem.EdgeError.Generation as e:
    assert str(e), e

print("python binding: OK")
