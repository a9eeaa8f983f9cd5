"""A local OpenAI-compatible Chat Completions server for tests and the `ppsehr bench llm` default.

Binds 127.0.0.1 on a free port in a background thread. It plays a small "model": for a JSON
request it writes an instance of the requested JSON Schema (from `response_format`, or from the
```json block of a prompt-mode request), with the skewed, mode-seeking preferences typical of
LLMs (first categories favoured, numbers near the middle of their range); for a free-text
request (a note) it paraphrases the facts it was given. Deterministic per request.

Scriptable, per request, with `script(action, template=None)` (consumed first in, first out,
by the first request whose prompt matches `template`, a substring of the system message):
  "429" / "500"     answer with that HTTP status (429 with Retry-After: 0)
  "timeout"         sleep `slow_seconds` before answering (the client times out first)
  "malformed"       reply with broken JSON
  "prose"           wrap the JSON reply in chatty prose and a ```json fence
  "ood"             put out-of-domain values into generated records
  "pii"             add a fake person name and phone number to the reply
  "short" / "long"  a records reply with half / 3 more records than asked for
  "copy"            a records reply that copies the prompt's example records verbatim
  "truncate"        the reply cut off mid-way, finish_reason "length" (a model looping to max_tokens)
  "overflow"        HTTP 400 "maximum context length" (as llama-cpp-python / vLLM / OpenAI say it)
  "contradict"      a note that states a cholesterol value in another bin than the record's
Server-wide switches: `json_schema=False` / `json_object=False` answer 400 to that
`response_format` (like servers without structured output); `json_object_schema=False` refuses
a "schema" field in a json_object response_format (llama-cpp-python honours it); `json_schema_status=500` answers
json_schema with HTTP 500 instead (as llama.cpp's server does); `context=N` refuses prompts longer
than N tokens (characters / 4) with a 400 naming the sizes (`overflow_numbers=False`: without
them, as llama.cpp's message reads); replies are cut at `max_tokens` (finish_reason "length");
`ignore_schema=True` accepts json_schema but answers prose around the JSON;
`handlers[schema name or "note"]` replaces the reply. Requests without a JSON Schema (the reply's
shape given as a hint in the prompt) are answered from the dictionary the prompt spells out.
Every request is kept in `requests` (path, headers, body) for assertions.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

FAKE_NAME, FAKE_PHONE = "John Smith", "+1 (555) 234-5678"


class FakeOpenAI:
    def __init__(self, model: str = "fake-model", json_schema: bool = True, json_object: bool = True,
                 ignore_schema: bool = False, slow_seconds: float = 1.0, delay: float = 0.0, usage: bool = True,
                 json_schema_status: int = 400, context: int = 0, overflow_numbers: bool = True,
                 json_object_schema: bool = True):
        self.model, self.json_schema, self.json_object, self.ignore_schema = model, json_schema, json_object, ignore_schema
        self.slow_seconds, self.delay, self.usage = slow_seconds, delay, usage
        self.json_schema_status, self.context, self.overflow_numbers = json_schema_status, context, overflow_numbers
        self.json_object_schema = json_object_schema
        self.requests: list[dict[str, Any]] = []
        self.handlers: dict[str, Callable[[dict], str]] = {}  # schema name or "note" -> reply content
        self._actions: deque[tuple[str, str | None]] = deque()
        self._lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def script(self, action: str, template: str | None = None, times: int = 1) -> "FakeOpenAI":
        with self._lock:
            self._actions.extend([(action, template)] * times)
        return self

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model", "owned_by": "ppsehr-tests"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(400, {"error": {"message": "invalid JSON body"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    status, payload, headers = fake.respond(body)
                finally:
                    with fake._lock:  # before the reply goes out: the client may send its next request at once
                        fake.inflight -= 1
                self._send(status, payload, headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-openai",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the "model"
    def _next_action(self, system: str) -> str | None:
        with self._lock:
            for i, (action, template) in enumerate(self._actions):
                if template is None or template in system:
                    del self._actions[i]
                    return action
        return None

    def respond(self, body: dict) -> tuple[int, dict, dict]:
        messages = body.get("messages") or []
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        text = "\n".join(str(m.get("content", "")) for m in messages)
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema" and not self.json_schema and self.json_schema_status >= 500:
            # llama.cpp: the schema cannot be turned into a grammar -> a server error, the same every time
            return self.json_schema_status, {"error": {"code": self.json_schema_status, "type": "server_error",
                                                       "message": "Internal Server Error"}}, {}
        if rf.get("type") == "json_object" and "schema" in rf and not self.json_object_schema:
            return 400, {"error": {"message": "response_format: extra fields not permitted ('schema')",
                                   "type": "invalid_request_error", "param": "response_format"}}, {}
        if (rf.get("type") == "json_schema" and not self.json_schema) or (rf.get("type") == "json_object" and not self.json_object):
            return 400, {"error": {"message": f"response_format type {rf['type']} is not supported by this server",
                                   "type": "invalid_request_error", "param": "response_format"}}, {}
        prompt_tokens = len(text) // 4 + 1
        action = self._next_action(system)
        if action == "overflow" or (self.context and prompt_tokens > self.context):
            ctx = self.context or max(256, prompt_tokens // 2)
            if self.overflow_numbers:
                message = (f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{prompt_tokens + int(body.get('max_tokens') or 0)} tokens ({prompt_tokens} in the messages, "
                           f"{int(body.get('max_tokens') or 0)} in the completion). Please reduce the length of the messages or completion.")
            else:
                message = "the request exceeds the available context size, try increasing it"
            return 400, {"error": {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}}, {}
        if self.delay:
            time.sleep(self.delay)
        if action in ("429", "500"):
            return int(action), {"error": {"message": "rate limited" if action == "429" else "internal error"}}, (
                {"retry-after": "0"} if action == "429" else {})
        if action == "timeout":
            time.sleep(self.slow_seconds)
        seed = int(hashlib.sha256((json.dumps(messages, sort_keys=True) + str(body.get("seed"))).encode()).hexdigest()[:12], 16)
        rng = random.Random(seed)
        schema, name = None, ""
        if rf.get("type") == "json_schema" and not self.ignore_schema:
            schema, name = rf["json_schema"].get("schema"), rf["json_schema"].get("name", "")
        elif rf.get("type") == "json_object" and "schema" in rf:  # llama-cpp-python: constrained to the schema
            schema = rf["schema"]
            m = re.search(r"\(named (\w+)\)", system)
            name = m.group(1) if m else ""
        else:
            m = re.search(r"\(named (\w+)\):\n```json\n(.*?)\n```", system, re.DOTALL)
            if m:
                name, schema = m.group(1), json.loads(m.group(2))
            else:
                m = re.search(r"shaped like this \(named (\w+)\):\n```\n", system)
                if m:
                    name, schema = m.group(1), schema_from_prompt(m.group(1), text)
        if rf.get("type") == "json_schema" and self.ignore_schema and name == "":
            m = re.search(r'"name":\s*"(\w+)"', json.dumps(rf))
            name, schema = (m.group(1) if m else ""), rf["json_schema"].get("schema")
        is_reask = any(m.get("role") == "assistant" for m in messages)
        if schema is not None:
            if name in self.handlers:
                content = self.handlers[name](body)
            elif name == "probe":
                content = json.dumps({"ok": True, "n": 3})
            else:
                obj = instance(schema, rng, name)
                if name == "records":
                    follow_prompt(obj, schema, text, rng)
                if action == "ood" and name == "records":
                    corrupt(obj, schema, rng)
                if action == "short" and name == "records":
                    obj["records"] = obj["records"][:max(1, len(obj["records"]) // 2)]
                if action == "long" and name == "records":
                    obj["records"] += [dict(r) for r in obj["records"][:3]]
                if action == "copy" and name == "records":
                    examples = json_lines(text)
                    obj["records"] = (examples * len(obj["records"]))[:len(obj["records"])] if examples else obj["records"]
                if action == "pii":
                    inject_pii(obj)
                content = json.dumps(obj)
            if action == "malformed":
                content = content[: max(1, len(content) // 2)]  # cut off mid-object
            elif action == "prose" or (self.ignore_schema and not is_reask):
                content = f"Sure! Here is the data you asked for:\n```json\n{content}\n```\nLet me know if you need more."
        else:
            content = self.handlers["note"](body) if "note" in self.handlers else note_from_facts(text)
            if action == "pii":
                content += f" Her brother {FAKE_NAME} can be reached at {FAKE_PHONE}."
            if action == "contradict":
                content = contradict(content, text)
        finish = "stop"
        limit = int(body.get("max_tokens") or 0)
        if action == "truncate":
            content, finish = content[: max(1, int(len(content) * 0.6))], "length"
        elif limit and len(content) // 4 + 1 > limit:
            content, finish = content[: limit * 4], "length"
        completion = {"id": f"chatcmpl-{seed:x}", "object": "chat.completion", "created": int(time.time()),
                      "model": body.get("model", self.model),
                      "choices": [{"index": 0, "finish_reason": finish,
                                   "message": {"role": "assistant", "content": content}}]}
        if self.usage:
            p, c = prompt_tokens, len(content) // 4 + 1
            completion["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return 200, completion, {}


def instance(schema: dict, rng: random.Random, name: str = "") -> Any:
    """A schema instance with LLM-like skew: earlier enum values and mid-range numbers favoured."""
    t = schema.get("type")
    types = t if isinstance(t, list) else [t]
    if "enum" in schema:
        options = schema["enum"]
        weights = [1.0 / (k + 1) ** 1.3 for k in range(len(options))]
        return rng.choices(options, weights=weights)[0]
    if "object" in types:
        return {k: instance(sub, rng, k) for k, sub in schema.get("properties", {}).items()}
    if "array" in types:
        n = schema.get("minItems", 1 if name != "rules" else 0)
        n = max(n, min(schema.get("maxItems", 3), 3)) if name in ("dependencies",) else n
        return [instance(schema.get("items", {}), rng) for _ in range(n)]
    if "number" in types or "integer" in types:
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 100)
        x = rng.triangular(lo, hi, lo + 0.45 * (hi - lo))
        return int(round(x)) if "integer" in types else round(x, 1)
    if "boolean" in types:
        return True
    if "null" in types:
        return None
    return "synthetic"


def follow_prompt(obj: dict, schema: dict, prompt: str, rng: random.Random) -> None:
    """Follow the prompt imperfectly, as a model would: draw each variable from its stated percentages
    sharpened towards the mode (p^1.6), ignoring conditional structure; or copy-and-vary the examples."""
    props = schema["properties"]["records"]["items"]["properties"]
    dists = {}
    for var, spec in re.findall(r"^- (\w+): (.+%)$", prompt.split("Conditional percentages")[0], re.MULTILINE):
        cells = re.findall(r'(\[[-\d.]+,[-\d.]+[\])]|"" \(unknown\)|[\w.-]+) ([\d.]+)%', spec)
        if var in props and cells:
            dists[var] = ([c for c, _ in cells], [float(p) ** 1.6 for _, p in cells])
    examples = json_lines(prompt)
    for rec in obj["records"]:
        if examples and not dists:
            base = dict(rng.choice(examples))
            for k in rng.sample(sorted(props), k=min(2, len(props))):
                base[k] = instance(props[k], rng)
            rec.update({k: v for k, v in base.items() if k in props})
            continue
        for var, (cells, weights) in dists.items():
            cell = rng.choices(cells, weights=weights)[0]
            if cell.startswith('""'):
                rec[var] = None if _numeric(props[var]) else ""
            elif cell.startswith("["):
                lo, hi = (float(x) for x in cell[1:-1].split(","))
                x = rng.uniform(lo, hi)
                x = round(x, 1) if hi - lo <= 2 else int(x) if int(x) >= lo else lo
                grid = [v for v in props[var].get("enum", ()) if isinstance(v, (int, float))]
                rec[var] = min(grid, key=lambda v: abs(v - x)) if grid else x  # a grammar allows only the listed numbers
            else:
                rec[var] = cell


def _numeric(spec: dict) -> bool:
    """A numeric variable's schema: a range, or (for grammar-constrained servers) an enum of numbers."""
    return "minimum" in spec or any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec.get("enum", ()))


def corrupt(obj: dict, schema: dict, rng: random.Random) -> None:
    """Out-of-domain values of the kinds models produce: wrong case, invented categories, absurd numbers."""
    props = schema["properties"]["records"]["items"]["properties"]
    cats = [k for k, s in props.items() if "enum" in s and any(isinstance(v, str) and v.isalpha() for v in s["enum"])]
    nums = [k for k, s in props.items() if _numeric(s)]
    recs = obj["records"]
    if recs and cats:
        k = cats[0]
        recs[0][k] = str(next(v for v in props[k]["enum"] if v)).upper().replace("_", " ")  # repairable
    if len(recs) > 1 and cats:
        recs[1][cats[-1]] = "banana"  # not repairable: rejected
    top = (props[nums[0]].get("maximum") if nums and "maximum" in props[nums[0]]
           else max((v for v in props[nums[0]]["enum"] if isinstance(v, (int, float))), default=0) if nums else 0)
    if len(recs) > 2 and nums:
        recs[2][nums[0]] = top * 50  # absurd: rejected
    if len(recs) > 3 and nums:
        recs[3][nums[0]] = top + 1  # slightly out of range: the dictionary's policy


def inject_pii(obj: Any) -> None:
    """Append a name and phone number to the first free-text string field found."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and k in ("description", "reason"):
                obj[k] = v + f" As told by {FAKE_NAME}, phone {FAKE_PHONE}."
                return
            inject_pii(v)
    elif isinstance(obj, list):
        for x in obj:
            inject_pii(x)


def json_lines(text: str) -> list[dict]:
    """The lines of a prompt that are JSON objects (example records)."""
    out = []
    for line in re.findall(r"^(\{.*\})$", text, re.MULTILINE):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def schema_from_prompt(name: str, prompt: str) -> dict:
    """The JSON Schema a hint stands for, rebuilt from the dictionary the prompt spells out."""
    props: dict[str, Any] = {}
    for var, kind, dom in re.findall(r"^- (\w+) \((categorical|numeric)[^)]*\): .*?Value: (.*)$", prompt, re.MULTILINE):
        missing = '"" if unknown' in dom
        if kind == "categorical":
            cats = [c.strip() for c in dom.split("one of:", 1)[1].split(";")[0].rstrip(".").split(",")]
            props[var] = {"type": "string", "enum": cats + ([""] if missing else [])}
        else:
            lo, hi = (float(x) for x in re.search(r"\[([-\d.]+), ([-\d.]+)\]", dom).groups())
            props[var] = {"type": ["number", "null"] if missing else "number", "minimum": lo, "maximum": hi}
    names = list(props)
    if name == "records":
        n = int((re.search(r"generate (\d+) new records", prompt) or re.search(r"(\d+)", "1")).group(1))
        item = {"type": "object", "required": names, "properties": props}
        return {"type": "object", "properties": {"records": {"type": "array", "minItems": n, "maxItems": n, "items": item}}}
    if name == "knowledge":
        var = {"type": "string", "enum": names}
        return {"type": "object", "properties": {
            "dependencies": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
                "variables": {"type": "array", "minItems": 2, "maxItems": 3, "items": var}, "reason": {"type": "string"}}}},
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "description": {"type": "string"}, "conditions": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "properties": {"variable": var, "op": {"type": "string", "enum": ["in"]},
                                                     "values": {"type": "array", "items": {"type": "string"}},
                                                     "value": {"type": "null"}}}},
                "repair": var}}}}}
    return {"type": "object", "properties": {}}


def contradict(note: str, prompt: str) -> str:
    """A note that gets the record's cholesterol wrong (another bin)."""
    m = re.search(r"cholesterol: (\d+)", prompt, re.IGNORECASE)
    if not m:
        return note + " Serum total cholesterol was 610 mg/dL."
    x = int(m.group(1))
    wrong = x + 200 if x < 400 else x - 250
    return f"The patient's serum total cholesterol was {wrong} mg/dL. " + note


def note_from_facts(prompt: str) -> str:
    facts = re.findall(r"^- (.+?): (.+)$", prompt, re.MULTILINE)
    parts = [f"{k.lower()} {v}" for k, v in facts[:5]]
    return "Synthetic patient seen for evaluation; " + "; ".join(parts) + "."


if __name__ == "__main__":  # python tests/fake_openai_server.py  -> serve until Ctrl-C
    with FakeOpenAI() as f:
        print(f.base_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
