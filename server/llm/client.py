"""A client for any OpenAI-compatible Chat Completions endpoint (vLLM, Ollama, llama.cpp, hosted APIs).

Built on the `openai` package with its own request loop. Every answer of the endpoint is
classified (`classify`):
  unsupported  the server refuses a structured-output feature (400/422, or a 5xx that names the
               feature or repeats): the client falls back json_schema -> json_object -> prompt
               and remembers the mode for the run (`EndpointMemory`);
  overflow     the prompt does not fit the model's context (a 400 that says so): the context size
               is learnt from the message and `LLMContextError` is raised (callers trim and retry);
  transient    429, 408/409, other 5xx, connection errors: retried with backoff (Retry-After
               honoured); a timeout teaches the speed model and is retried once with the time it
               needs (doubled on a one-request-at-a-time endpoint: the server is still busy with the
               abandoned request), and not at all when the time budget cannot cover that;
  fatal        401/403 (key), 404 (model), other 4xx: `LLMError` at once.
Nothing else leaves the client: every failure a caller sees is an `LLMError`.

Requests adapt to the endpoint. The context size, prompt and completion speeds, characters per
token and parallel slots come from a profile measured by `ppsehr llm check` (`write_profile`,
`load_profile`) and are refined by every answer: a request's `max_tokens` is what the reply can
use of the context, its timeout what the endpoint needs for the prompt and that many tokens
(unless --llm-timeout fixes it), and a prompt that cannot fit is never sent. A time budget
(`set_deadline`) bounds a whole use: no request starts that cannot finish in it.

Structured output: JSON Schema through `response_format` where the server supports it, else a
JSON object with the expected shape spelled out in the prompt; either way the reply is parsed,
a reply cut off at `max_tokens` is salvaged to its last complete item, and an invalid reply is
re-asked a bounded number of times with the error (the re-ask is trimmed to the context; if it
still does not fit, a fresh request is sent instead). Every call's token usage and latency is
recorded. Replies are cached on disk keyed by a hash of the request, so a rerun costs nothing.
After a few consecutive requests fail to reach the endpoint at all, the client stops trying.

The API key comes from PPSEHR_LLM_API_KEY or OPENAI_API_KEY and is never stored in the config,
the cache, the profile, logs, messages or the release.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from ...common.errors import PpsehrError
from .prompts import Prompt, probe_prompt, validate_schema

KEY_VARIABLES = ("PPSEHR_LLM_API_KEY", "OPENAI_API_KEY")
MODES = ("json_schema", "json_object_schema", "json_object", "prompt")
# json_object_schema: {"type": "json_object", "schema": ...}, llama-cpp-python's way of constraining a reply
# to a JSON Schema (its server has no json_schema type); servers that refuse the extra field fall back
PROFILE_FORMAT = "ppsehr-llm-profile"
PROFILE_VERSION = 1
DEFAULT_TIMEOUT = 120.0  # per request, while nothing is known about the endpoint's speed
DEFAULT_TIME_BUDGET = 1800.0
CHARS_PER_TOKEN = 3.0  # conservative until measured (English prose is ~4, JSON with numbers ~2.5-3)
CONTEXT_MARGIN = 48  # tokens kept free for the chat template and estimation error
T = TypeVar("T")
R = TypeVar("R")


class LLMError(PpsehrError):
    """An LLM call failed for good (after retries / re-asks), or the endpoint is unusable."""


class LLMContextError(LLMError):
    """A prompt does not fit the endpoint's context (refused by the server, or known not to fit before sending)."""

    def __init__(self, message: str, context: int = 0, prompt_tokens: int = 0):
        super().__init__(message)
        self.context, self.prompt_tokens = context, prompt_tokens


class LLMTimeBudgetError(LLMError):
    """The use's time budget is spent (or too little is left for the request): nothing was sent."""


@dataclass(frozen=True)
class LLMConfig:
    """LLM settings of a release. base_url/model None = offline (statistical engine only).

    uses: which uses run ("knowledge", "generate", "notes"). generate_rows: records to generate
    LLM-first (0 = the release's row count); generate_output "file" adds them as llm_records.csv,
    "records" makes them the release's records. cache_dir "" disables the response cache.
    timeout None: per request, from the endpoint's measured speed (else DEFAULT_TIMEOUT); a number
    fixes it. max_tokens: the cap of any reply (each request asks for what it needs, within the
    context). context 0: unknown (learnt from the first overflow answer). time_budget: seconds for
    the whole LLM stage (0 = none). The speed fields come from a profile (`ppsehr llm check`).
    """

    base_url: str | None = None
    model: str | None = None
    timeout: float | None = None
    max_retries: int = 4
    timeout_retries: int = 1
    backoff: float = 1.0
    backoff_max: float = 30.0
    concurrency: int = 4
    temperature: float = 0.7
    seed: int = 0
    max_tokens: int = 4096
    note_max_tokens: int = 220
    context: int = 0
    reask: int = 2
    structured: str = "auto"  # auto | json_schema | json_object_schema | json_object | prompt
    cache_dir: str = str(Path("~/.cache/ppsehr/llm"))
    uses: tuple[str, ...] = ("knowledge", "notes")
    language: str | None = None  # None: the dictionary's [llm] language, else "en"
    styles: tuple[str, ...] = ("rule",)
    batch_size: int = 20
    generate_rows: int = 0
    pool_factor: float = 1.5
    topup_calls: int = 3  # extra generation calls, at most, to make up for short batches
    generate_output: str = "file"  # file | records
    notes_limit: int | None = None
    note_retries: int = 1  # a note that contradicts its record is written again this many times, then dropped
    example_rows: int = 8
    fail_fast_after: int = 6
    time_budget: float = DEFAULT_TIME_BUDGET
    # measured by `ppsehr llm check` (0 = unknown)
    prompt_tps: float = 0.0
    completion_tps: float = 0.0
    overhead_s: float = 0.0
    chars_per_token: float = 0.0
    profile: str = ""  # where the measured settings came from (a profile file), for the manifest

    @property
    def enabled(self) -> bool:
        return bool(self.base_url and self.model)

    @property
    def host(self) -> str:
        return urlsplit(self.base_url or "").hostname or ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LLMConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PpsehrError(f"LLM settings: unknown key(s) {sorted(unknown)}")
        for k in ("uses", "styles"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> "LLMConfig":
        return LLMConfig(**{**self.to_dict(), "uses": tuple(self.uses), "styles": tuple(self.styles), **changes})

    def check(self) -> None:
        if bool(self.base_url) != bool(self.model):
            raise PpsehrError("LLM: give both --llm-base-url and --llm-model (or neither for a statistical-engine-only release)")
        if self.base_url and urlsplit(self.base_url).scheme not in ("http", "https"):
            raise PpsehrError(f"--llm-base-url must be an http(s) URL, got {self.base_url!r}")
        for u in self.uses:
            if u not in ("knowledge", "generate", "notes"):
                raise PpsehrError(f"LLM: unknown use {u!r} (knowledge, generate, notes)")
        if self.structured not in ("auto",) + MODES:
            raise PpsehrError(f"LLM: structured must be auto or one of {', '.join(MODES)}, got {self.structured!r}")
        if self.generate_output not in ("file", "records"):
            raise PpsehrError(f"LLM: generate_output must be 'file' or 'records', got {self.generate_output!r}")
        if self.concurrency < 1 or self.batch_size < 1 or self.max_retries < 0 or self.reask < 0:
            raise PpsehrError("LLM: concurrency and batch_size must be >= 1, max_retries and reask >= 0")
        if self.timeout is not None and not self.timeout > 0:
            raise PpsehrError(f"--llm-timeout must be > 0 seconds, got {self.timeout!r}")
        if self.max_tokens < 16 or self.context < 0 or (self.context and self.context < 256):
            raise PpsehrError("LLM: max_tokens must be >= 16 and context 0 (unknown) or >= 256 tokens")
        if self.time_budget < 0 or (self.notes_limit is not None and self.notes_limit < 0):
            raise PpsehrError("LLM: time_budget and notes_limit must be >= 0")


def api_key() -> str | None:
    for name in KEY_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class CallRecord:
    """What one logical call cost (re-asks and retries included)."""

    template: str
    prompt_hash: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    requests: int = 0
    reasks: int = 0
    cached: bool = False
    mode: str = ""
    ok: bool = False
    usage_reported: bool = True
    error: str = ""
    timeouts: int = 0
    truncated: int = 0  # replies cut off at max_tokens
    salvaged: bool = False  # the accepted reply was cut off and kept up to its last complete item
    max_tokens: int = 0


# ----------------------------------------------------------------------------- what the endpoint says
_OVERFLOW = re.compile(r"context[_ ]?(length|size|window)|maximum context|exceeds? (the )?(available )?context|"
                       r"too many tokens|prompt is too long|input is too long|n_ctx|context_length_exceeded|"
                       r"exceed_context_size|reduce the length of the messages|requested tokens \(\d+\) exceed", re.I)
_FEATURE = re.compile(r"response_format|json[_ ]?schema|json_object|grammar|structured|\bschema\b|not supported|"
                      r"unsupported|not implemented|not available", re.I)
_CTX_NUMBER = (re.compile(r"maximum context length is (\d+)", re.I), re.compile(r"context window of (\d+)", re.I),
               re.compile(r"\bn_ctx\D{0,12}(\d+)", re.I), re.compile(r"context (?:size|length|window)\D{0,24}(\d+)", re.I))
_PROMPT_NUMBER = (re.compile(r"requested tokens \((\d+)\)", re.I), re.compile(r"\((\d+) in the messages", re.I),
                  re.compile(r"n_prompt_tokens\D{0,12}(\d+)", re.I), re.compile(r"you requested (\d+) tokens", re.I),
                  re.compile(r"prompt (?:has|is|contains) (\d+) tokens", re.I))


def classify(status: int | None, message: str, structured: bool) -> str:
    """What an error answer means: overflow | unsupported | transient | auth | not_found | fatal.

    `structured`: the request carried a response_format. A 5xx on such a request is `transient`
    unless its message names the feature (then `unsupported`); the caller treats a repeated one
    as unsupported (llama.cpp refuses json_schema with HTTP 500)."""
    message = message or ""
    if status is None:
        return "transient"
    if status in (400, 413, 422) and _OVERFLOW.search(message):
        return "overflow"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if structured and status in (400, 422, 501):
        return "unsupported"
    if structured and status >= 500 and _FEATURE.search(message) and not _OVERFLOW.search(message):
        return "unsupported"
    if status >= 500 and _OVERFLOW.search(message):
        return "overflow"
    if status in (408, 409, 429) or status >= 500:
        return "transient"
    return "fatal"


def context_from_message(message: str, body: Any = None) -> tuple[int, int]:
    """(context size, prompt tokens) named by an overflow answer (0 where it names none)."""
    text = message + " " + (json.dumps(body) if isinstance(body, (dict, list)) else "")
    ctx = next((int(m.group(1)) for rx in _CTX_NUMBER for m in [rx.search(text)] if m), 0)
    prompt = next((int(m.group(1)) for rx in _PROMPT_NUMBER for m in [rx.search(text)] if m), 0)
    return ctx, prompt


@dataclass
class Speed:
    """Seconds a request takes: overhead + prompt tokens / prompt speed + completion tokens / completion
    speed, times a factor learnt from answers (load, queueing). Speeds 0 = unknown."""

    overhead_s: float = 0.0
    prompt_tps: float = 0.0
    completion_tps: float = 0.0
    factor: float = 1.0
    observed: int = 0

    @property
    def known(self) -> bool:
        return self.completion_tps > 0

    def raw(self, prompt_tokens: float, completion_tokens: float) -> float:
        pp = self.prompt_tps or 10 * self.completion_tps
        return self.overhead_s + prompt_tokens / pp + completion_tokens / self.completion_tps

    def predict(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        return self.factor * self.raw(prompt_tokens, completion_tokens) if self.known else None

    def slower_than(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A request of this size was not done after `seconds` (a timeout): predict at least 1.25 times that."""
        if not self.known:  # nothing measured: assume the prompt is read 10x faster than text is written
            self.completion_tps = max((prompt_tokens / 10 + completion_tokens) / (1.25 * max(seconds, 0.05)), 0.1)
            return
        raw = self.raw(prompt_tokens, completion_tokens)
        self.factor = min(max(self.factor, 1.25 * seconds / max(raw, 1e-3)), 50.0)

    def observe(self, prompt_tokens: int, completion_tokens: int, latency: float) -> None:
        self.observed += 1
        if prompt_tokens + completion_tokens <= 0 or latency <= 0:
            return
        if not self.known:  # first answer: assume the prompt is read 10x faster than text is written
            self.completion_tps = max((prompt_tokens / 10 + completion_tokens) / max(latency - self.overhead_s, 0.05), 0.1)
            return
        ratio = latency / max(self.raw(prompt_tokens, completion_tokens), 1e-3)
        # slower than expected: believe it at once (timeouts are worse than waiting); faster: drift back
        self.factor = min(max(ratio if ratio > self.factor else 0.8 * self.factor + 0.2 * ratio, 0.5), 50.0)


@dataclass
class EndpointMemory:
    """What a run learns about its endpoint, shared by the clients of one release (and `llm check`)."""

    mode: str | None = None
    mode_history: list[str] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)  # structured mode -> the server's answer
    context: int = 0
    context_source: str = ""
    chars_per_token: float = 0.0
    speed: Speed = field(default_factory=Speed)
    failed: dict[str, str] = field(default_factory=dict)  # prompt hash -> why it failed (not asked again)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def learn_context(self, ctx: int, source: str) -> None:
        with self.lock:
            if ctx >= 64 and (not self.context or ctx < self.context):
                self.context, self.context_source = ctx, source


class ResponseCache:
    """Replies on disk, one JSON file per request key; written atomically, corrupt entries ignored."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        """Best effort: a cache that cannot be written costs a rerun, never a release."""
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(value))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)


def extract_json(text: str) -> Any:
    """The JSON object in a reply: the whole text, else a fenced block, else the outermost {...}."""
    text = (text or "").strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for block in re.findall(r"```(?:json)?\s*(.*?)```", text, re.DOTALL):
        try:
            return json.loads(block)
        except ValueError:
            continue
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start:end + 1])
        except ValueError:
            pass
    raise ValueError("the reply is not valid JSON")


def salvage_json(text: str) -> Any:
    """A reply cut off mid-object, kept up to its last complete array item and closed: e.g.
    '{"records": [{...}, {...}, {"age": 5' -> {"records": [{...}, {...}]}. ValueError if nothing is left."""
    text = text or ""
    start = text.find("{")
    if start < 0:
        raise ValueError("the reply has no JSON object")
    stack: list[str] = []
    cut: tuple[int, list[str]] | None = None
    in_str = esc = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]":
            if not stack:
                break
            stack.pop()
            if not stack:
                return json.loads(text[start:i + 1])
            if stack[-1] == "[":  # an array item just closed: a safe place to cut
                cut = (i + 1, list(stack))
    if cut is None:
        raise ValueError("the reply was cut off before its first complete item")
    end, open_ = cut
    closing = "".join("]" if c == "[" else "}" for c in reversed(open_))
    return json.loads(text[start:end] + closing)


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    return int(math.ceil(len(text) / max(chars_per_token, 1.0)))


class LLMClient:
    """Calls one endpoint/model. Thread-safe; `map` runs calls concurrently within the limit."""

    def __init__(self, config: LLMConfig, sleep: Callable[[float], None] = time.sleep,
                 memory: EndpointMemory | None = None):
        import openai

        config.check()
        if not config.enabled:
            raise LLMError("no LLM endpoint configured")
        self.config = config
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=api_key() or "no-key",
                                     timeout=config.timeout or DEFAULT_TIMEOUT, max_retries=0)
        self._sleep = sleep
        self._sem = threading.Semaphore(config.concurrency)
        self._lock = threading.Lock()
        self.calls: list[CallRecord] = []
        self.memory = memory or EndpointMemory()
        m = self.memory
        with m.lock:
            if config.structured != "auto":
                m.mode = config.structured
            if config.context:
                m.context, m.context_source = config.context, m.context_source or "configured"
            if config.chars_per_token and not m.chars_per_token:
                m.chars_per_token = config.chars_per_token
            if config.completion_tps and not m.speed.known:
                m.speed = Speed(config.overhead_s, config.prompt_tps, config.completion_tps)
        self._unreachable = 0
        self.deadline: float | None = None
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None

    # ------------------------------------------------------------------ what is known about the endpoint
    @property
    def mode(self) -> str | None:
        return self.memory.mode

    @mode.setter
    def mode(self, value: str | None) -> None:
        self.memory.mode = value

    @property
    def mode_history(self) -> list[str]:
        return self.memory.mode_history

    @property
    def context(self) -> int:
        return self.memory.context

    @property
    def chars_per_token(self) -> float:
        return self.memory.chars_per_token or CHARS_PER_TOKEN

    def tokens(self, text: str) -> int:
        """Estimated tokens of a text at this endpoint (conservative)."""
        return estimate_tokens(text, self.chars_per_token)

    def message_tokens(self, messages: list[dict]) -> int:
        return sum(self.tokens(m["content"]) + 6 for m in messages) + 8

    def prompt_tokens(self, prompt: Prompt, mode: str | None = "auto") -> int:
        """Estimated prompt tokens of a prompt as it will be sent (schema in the prompt unless json_schema)."""
        mode = (self.mode or "json_schema") if mode == "auto" else mode
        return self.message_tokens(prompt.chat_messages(schema_in_prompt=prompt.schema_json is not None and mode != "json_schema"))

    def reply_room(self, prompt_tokens: int) -> int | None:
        """Tokens left for a reply after a prompt of this size (None: context unknown)."""
        return None if not self.context else self.context - prompt_tokens - CONTEXT_MARGIN

    def affordable_tokens(self, prompt_tokens: int) -> int | None:
        """Reply tokens the endpoint can write, at its observed speed, before the deadline (None: no
        deadline or speed unknown); requests are sized to it so that a slow endpoint gives a short
        answer in time rather than a long one cut off by the budget."""
        left, sp = self.remaining(), self.memory.speed
        if left is None or not sp.known:
            return None
        read = sp.predict(prompt_tokens, 0) or 0.0
        return max(0, int(0.8 * (left - read) * sp.completion_tps / sp.factor))

    def set_deadline(self, seconds: float | None) -> None:
        """No request starts after this many seconds from now (None: no limit)."""
        self.deadline = None if seconds is None else time.monotonic() + max(seconds, 0.0)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    # ------------------------------------------------------------------ public
    def text(self, prompt: Prompt, max_tokens: int | None = None) -> tuple[str, CallRecord]:
        """A free-text reply."""
        rec = CallRecord(prompt.template.id, prompt.hash)
        key = self._key(prompt, max_tokens)
        hit = self._cached(key, rec)
        if hit is not None:
            return hit, rec
        content = self._timed(rec, lambda: self._request(prompt.chat_messages(False), None, prompt, rec, max_tokens))
        self._store(key, content, rec)
        return content, rec

    def json(self, prompt: Prompt, validate: Callable[[Any], None] | None = None,
             max_tokens: int | None = None) -> tuple[Any, CallRecord]:
        """A JSON reply that validates (against the prompt's schema, or with `validate`), re-asked if needed."""
        if prompt.schema_json is None:
            raise ValueError("json() needs a prompt with a schema")
        schema = prompt.schema
        check = validate or (lambda obj: validate_schema(obj, schema))
        rec = CallRecord(prompt.template.id, prompt.hash)
        key = self._key(prompt, max_tokens)
        hit = self._cached(key, rec)
        if hit is not None:
            try:
                obj = _parse(hit, check)[0]
                return obj, rec
            except ValueError:
                rec.cached = rec.ok = False  # stale or foreign entry: ask again
        obj, content = self._timed(rec, lambda: self._json_call(prompt, check, rec, max_tokens))
        self._store(key, content, rec)
        return obj, rec

    def _timed(self, rec: CallRecord, call: Callable[[], T]) -> T:
        """Run one (possibly re-asked) call; record its latency and outcome whether it succeeds or not.
        Whatever goes wrong leaves as an LLMError."""
        t0 = time.perf_counter()
        failed = self.memory.failed.get(rec.prompt_hash)
        try:
            if failed:
                raise LLMError(f"{rec.template}: not asked again in this run (it failed before: {failed[:160]})")
            out = call()
            rec.ok = True
            return out
        except LLMError as e:
            rec.error = str(e)[:300]
            if not isinstance(e, (LLMTimeBudgetError, LLMContextError)) and not failed:
                with self.memory.lock:
                    self.memory.failed[rec.prompt_hash] = str(e)[:300]
            raise
        except _Unsupported as e:  # cannot happen (the JSON loop handles it); never let it out
            rec.error = str(e)[:300]
            raise LLMError(f"{rec.template}: the endpoint refused the request: {e}") from None
        except self._openai.OpenAIError as e:
            rec.error = f"{type(e).__name__}: {str(e)[:200]}"
            raise LLMError(f"{rec.template}: {rec.error}") from None
        finally:
            rec.latency_s = time.perf_counter() - t0
            if rec.requests or rec.ok or not rec.error.startswith(f"{rec.template}: the LLM time budget is spent"):
                self._record(rec)  # a call the time budget did not let out is no call (the use counts it as skipped)

    def map(self, fn: Callable[[T], R], items: Iterable[T], on_done: Callable[[int, R], None] | None = None) -> list[R]:
        """fn over items, up to `concurrency` at a time, results in order (exceptions re-raised).
        on_done(number finished so far, result) is called as each one finishes."""
        items = list(items)
        if len(items) <= 1 or self.config.concurrency == 1:
            out = []
            for x in items:
                out.append(fn(x))
                if on_done:
                    on_done(len(out), out[-1])
            return out
        results: list[Any] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for k, fut in enumerate(as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                if on_done:
                    on_done(k, results[futures[fut]])
        return results

    def usage(self) -> dict[str, Any]:
        with self._lock:
            calls = list(self.calls)
        m = self.memory
        return {"calls": len(calls), "requests": sum(c.requests for c in calls),
                "cached_calls": sum(c.cached for c in calls), "failed_calls": sum(not c.ok for c in calls),
                "reasks": sum(c.reasks for c in calls), "timeouts": sum(c.timeouts for c in calls),
                "truncated_replies": sum(c.truncated for c in calls), "salvaged_replies": sum(c.salvaged for c in calls),
                "prompt_tokens": sum(c.prompt_tokens for c in calls),
                "completion_tokens": sum(c.completion_tokens for c in calls),
                "usage_reported": all(c.usage_reported for c in calls if not c.cached),
                "latency_s": round(sum(c.latency_s for c in calls), 3),
                "structured_output": m.mode or "not determined",
                "structured_fallbacks": {k: v for k, v in m.refusals.items()},
                "context_tokens": m.context or None, "context_source": m.context_source or None}

    # ------------------------------------------------------------------ internals
    def _key(self, prompt: Prompt, max_tokens: int | None) -> str:
        c = self.config
        req = {"base_url": c.base_url, "model": c.model, "prompt": prompt.hash, "temperature": c.temperature,
               "seed": c.seed + prompt.seed_offset, "max_tokens": max_tokens or c.max_tokens}
        return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()

    def _cached(self, key: str, rec: CallRecord) -> str | None:
        if self.cache is None:
            return None
        hit = self.cache.get(key)
        if hit is None or not isinstance(hit.get("content"), str):
            return None
        rec.cached, rec.ok, rec.mode = True, True, hit.get("mode", "")
        self._record(rec)
        return hit["content"]

    def _store(self, key: str, content: str, rec: CallRecord) -> None:
        if self.cache is not None:
            self.cache.put(key, {"content": content, "mode": rec.mode, "template": rec.template,
                                 "prompt_hash": rec.prompt_hash, "model": self.config.model,
                                 "usage": {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens}})

    def _record(self, rec: CallRecord) -> None:
        with self._lock:
            if not any(r is rec for r in self.calls):
                self.calls.append(rec)

    def _json_call(self, prompt: Prompt, check: Callable[[Any], None], rec: CallRecord,
                   max_tokens: int | None) -> tuple[Any, str]:
        while True:
            mode = self.mode or "json_schema"
            messages = prompt.chat_messages(schema_in_prompt=mode != "json_schema")
            try:
                return self._json_attempts(prompt, check, rec, mode, messages, max_tokens)
            except _Unsupported as e:  # on the first request or a re-ask: next mode, from the start
                self._downgrade(mode, str(e))

    def _json_attempts(self, prompt: Prompt, check: Callable[[Any], None], rec: CallRecord, mode: str,
                       messages: list[dict], max_tokens: int | None) -> tuple[Any, str]:
        cut = rec.truncated
        content = self._request(messages, mode, prompt, rec, max_tokens)
        rec.mode = mode
        self._set_mode(mode)
        fresh = 0
        for attempt in range(self.config.reask + 1):
            try:
                obj, salvaged = _parse(content, check, rec.truncated > cut)
                cut = rec.truncated
                rec.salvaged = salvaged
                return obj, content if not salvaged else json.dumps(obj)
            except ValueError as e:
                if attempt == self.config.reask:
                    raise LLMError(f"{prompt.template.id}: no valid JSON after {self.config.reask} re-ask(s): {e}") from None
                rec.reasks += 1
                correction = (f"That reply is not valid: {str(e)[:300]}. Reply again with only the corrected JSON "
                              "object, satisfying the schema" + (", shorter" if rec.truncated else "") + ".")
                reask = self._fit_reask(messages, content, correction, max_tokens)
                if reask is None:  # the conversation cannot fit: ask afresh (another seed) instead
                    fresh += 1
                    cut = rec.truncated
                    content = self._request(messages, mode, prompt, rec, max_tokens, seed_shift=fresh)
                    continue
                cut = rec.truncated
                try:
                    content = self._request(reask, mode, prompt, rec, max_tokens)
                except LLMContextError:  # the server says it does not fit after all: a fresh request
                    fresh += 1
                    content = self._request(messages, mode, prompt, rec, max_tokens, seed_shift=fresh)
        raise AssertionError("unreachable")

    def _fit_reask(self, messages: list[dict], content: str, correction: str, max_tokens: int | None) -> list[dict] | None:
        """The re-ask conversation, the previous reply shortened to fit the context; None if even that does not fit."""
        room = None
        if self.context:
            reply = min(max_tokens or self.config.max_tokens, self.config.max_tokens)
            room = self.context - CONTEXT_MARGIN - min(reply, self.context // 4) - self.message_tokens(
                messages + [{"role": "user", "content": correction}, {"role": "assistant", "content": ""}])
            if room < 32:
                return None
        keep = content[:4000] if room is None else content[:max(0, int(room * self.chars_per_token * 0.9))]
        if len(keep) < len(content):
            keep += " ..."
        return messages + [{"role": "assistant", "content": keep}, {"role": "user", "content": correction}]

    def _set_mode(self, mode: str) -> None:
        with self.memory.lock:
            if self.memory.mode is None:
                self.memory.mode = mode
                self.memory.mode_history.append(mode)

    def _downgrade(self, failed: str, why: str = "") -> None:
        m = self.memory
        with m.lock:
            m.refusals.setdefault(failed, why[:300])
            nxt = MODES[min(MODES.index(failed) + 1, len(MODES) - 1)]
            if m.mode is None or MODES.index(m.mode) <= MODES.index(failed):
                m.mode = nxt
                m.mode_history.append(nxt)

    def _budget_tokens(self, messages: list[dict], max_tokens: int | None, template: str) -> tuple[int, int]:
        """(estimated prompt tokens, max_tokens for the reply) within the context; LLMContextError if it cannot fit."""
        est = self.message_tokens(messages)
        want = min(max_tokens or self.config.max_tokens, self.config.max_tokens)
        if self.context:
            room = self.context - est - CONTEXT_MARGIN
            if room < min(want, 64):
                raise LLMContextError(f"{template}: the prompt (about {est} tokens) leaves no room for a reply in the "
                                      f"endpoint's context of {self.context} tokens; not sent", self.context, est)
            want = min(want, room)
        return est, max(want, 1)

    def _request_timeout(self, prompt_tokens: int, max_tokens: int, template: str) -> float:
        """Seconds this request may take: fixed, or from the endpoint's speed; within the time budget."""
        c = self.config
        if c.timeout is not None:
            t = c.timeout
        else:
            predicted = self.memory.speed.predict(prompt_tokens, max_tokens)
            t = DEFAULT_TIMEOUT if predicted is None else max(30.0, 1.5 * predicted + 15.0)
            if predicted is not None and c.concurrency == 1:
                # one request at a time, and llama.cpp-style servers finish what a client abandons: a timeout
                # costs the whole request anyway and its retry queues behind it, so wait longer before giving up
                t = max(t, 3.0 * predicted)
        left = self.remaining()
        if left is not None:
            predicted = self.memory.speed.predict(prompt_tokens, min(max_tokens, 64))
            if left < 0.1 or (predicted is not None and left < predicted):
                raise LLMTimeBudgetError(f"{template}: the LLM time budget is spent ({max(left, 0):.0f} s left); not sent")
            t = min(t, left)
        return t

    def _request(self, messages: list[dict], mode: str | None, prompt: Prompt, rec: CallRecord,
                 max_tokens: int | None = None, seed_shift: int = 0) -> str:
        c = self.config
        oa = self._openai
        est, want = self._budget_tokens(messages, max_tokens, prompt.template.id)
        rec.max_tokens = want
        kwargs: dict[str, Any] = {"model": c.model, "messages": messages, "temperature": c.temperature,
                                  "seed": c.seed + prompt.seed_offset + 7919 * seed_shift, "max_tokens": want}
        if mode == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": prompt.schema_name or "reply", "schema": prompt.schema, "strict": True}}
        elif mode == "json_object_schema":  # compiled into a grammar: numeric ranges as enums (Prompt.grammar_schema)
            kwargs["response_format"] = {"type": "json_object", "schema": prompt.grammar_schema}
        elif mode == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        structured = mode in MODES[:3]
        attempt = timeouts = server_errors = 0
        timeout_scale = 1.0
        while True:
            if self._unreachable >= c.fail_fast_after:
                raise LLMError(f"the LLM endpoint {c.host} did not answer {self._unreachable} requests in a row; giving up")
            timeout = self._request_timeout(est, want, prompt.template.id) * timeout_scale
            left = self.remaining()
            if left is not None:
                timeout = min(timeout, max(left, 1.0))
            rec.requests += 1
            t0 = time.perf_counter()
            try:
                with self._sem:
                    resp = self._client.chat.completions.create(**kwargs, timeout=timeout)
            except oa.APITimeoutError:
                waited = time.perf_counter() - t0
                rec.timeouts += 1
                timeouts += 1
                with self._lock:
                    self._unreachable += 1
                # the endpoint is slower than predicted (a grammar, a long context, other load): believe it, so
                # that what follows (its retry, later requests, what fits in the time left) is sized to it
                self.memory.speed.slower_than(est, want, waited)
                if timeouts > c.timeout_retries or attempt >= c.max_retries:
                    raise LLMError(f"{prompt.template.id}: timed out after {timeouts} attempt(s) "
                                   f"(last timeout {timeout:.3g} s)") from None
                left = self.remaining()
                if left is not None and left < 2 * waited:
                    # a server that does not cancel is still busy with the abandoned request: a retry would only
                    # queue behind it and be abandoned too, keeping the endpoint busy past the budget
                    raise LLMTimeBudgetError(f"{prompt.template.id}: timed out after {waited:.0f} s; not retried, "
                                             f"{max(left, 0):.0f} s of the LLM time budget left") from None
                # the same request again, with the time it needs after what was learnt, and (one request at a time)
                # the time the abandoned one still keeps the server busy
                timeout_scale = 2.0 if (c.concurrency == 1 or c.timeout is not None) else 1.0
                attempt += 1
                self._sleep(self._delay(attempt - 1, None))
                continue
            except oa.APIConnectionError:
                with self._lock:
                    self._unreachable += 1
                if attempt >= c.max_retries:
                    raise LLMError(f"{prompt.template.id}: unreachable after {attempt + 1} attempt(s)") from None
                self._sleep(self._delay(attempt, None))
                attempt += 1
                continue
            except oa.APIStatusError as e:
                with self._lock:
                    self._unreachable = 0
                msg = _message(e)
                kind = classify(e.status_code, msg, structured)
                if kind == "transient" and structured and e.status_code >= 500:
                    server_errors += 1
                    if server_errors >= 2:  # the same structured request fails twice: treat the feature as unsupported
                        kind = "unsupported"
                if kind == "overflow":
                    ctx, used = context_from_message(msg, getattr(e, "body", None))
                    if ctx:
                        self.memory.learn_context(ctx, "the endpoint's overflow answer")
                    else:  # no number: the largest common size below what was asked for
                        guess = max((k for k in (1024, 2048, 4096, 8192, 16384, 32768) if k < (used or est) + want),
                                    default=1024)
                        self.memory.learn_context(guess, "guessed from an overflow answer without a size")
                        ctx = self.memory.context
                    raise LLMContextError(f"{prompt.template.id}: the prompt does not fit the endpoint's context "
                                          f"(HTTP {e.status_code}: {msg[:200]})", ctx, used or est) from None
                if kind == "unsupported":
                    raise _Unsupported(f"HTTP {e.status_code}: {msg}") from None
                if kind == "auth":
                    raise LLMError(f"the endpoint {c.host} refused the API key ({e.status_code}); set PPSEHR_LLM_API_KEY") from None
                if kind == "not_found":
                    raise LLMError(f"the endpoint {c.host} has no model {c.model!r} or no chat completions API (404): {msg}") from None
                if kind == "fatal":
                    raise LLMError(f"{prompt.template.id}: the endpoint refused the request (HTTP {e.status_code}): {msg}") from None
                if attempt >= c.max_retries:
                    raise LLMError(f"{prompt.template.id}: HTTP {e.status_code} after {attempt + 1} attempt(s): {msg[:160]}") from None
                self._sleep(self._delay(attempt, e))
                attempt += 1
                continue
            except oa.OpenAIError as e:  # anything else the client raises (e.g. an unparseable response)
                raise LLMError(f"{prompt.template.id}: {type(e).__name__}: {str(e)[:200]}") from None
            latency = time.perf_counter() - t0
            if not hasattr(resp, "choices"):
                raise LLMError(f"{prompt.template.id}: the endpoint did not answer with a chat completion")
            with self._lock:
                self._unreachable = 0
            usage = getattr(resp, "usage", None)
            choice = resp.choices[0] if resp.choices else None
            content = choice.message.content if choice is not None and choice.message is not None else None
            if usage is not None:
                p, n = int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)
                rec.prompt_tokens += p
                rec.completion_tokens += n
                self._learn(messages, p, n, latency)
            else:
                rec.usage_reported = False
            if choice is not None and getattr(choice, "finish_reason", None) == "length":
                rec.truncated += 1
            return content or ""

    def _learn(self, messages: list[dict], prompt_tokens: int, completion_tokens: int, latency: float) -> None:
        m = self.memory
        with m.lock:
            m.speed.observe(prompt_tokens, completion_tokens, latency)
            chars = sum(len(x["content"]) for x in messages)
            if prompt_tokens > 50:
                seen = chars / prompt_tokens  # template tokens included: errs low, i.e. safe
                m.chars_per_token = min(m.chars_per_token, seen) if m.chars_per_token else seen

    def _delay(self, attempt: int, error: Exception | None) -> float:
        c = self.config
        delay = min(c.backoff_max, c.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
        headers = getattr(getattr(error, "response", None), "headers", None)
        if headers is not None:
            try:
                delay = max(delay, min(c.backoff_max, float(headers.get("retry-after", 0))))
            except (TypeError, ValueError):
                pass
        return delay


class _Unsupported(Exception):
    """The server refused a structured-output request: try the next mode. Never leaves the client."""


def _parse(content: str, check: Callable[[Any], None], truncated: bool = False) -> tuple[Any, bool]:
    """(the validated object, whether it was salvaged from a reply cut off at max_tokens)."""
    try:
        obj = extract_json(content)
    except ValueError:
        if not truncated:
            raise
        obj = None
    if obj is not None:
        check(obj)
        return obj, False
    try:
        obj = salvage_json(content)
    except ValueError:
        raise ValueError("the reply is not valid JSON" + (" (it was cut off at max_tokens)" if truncated else "")) from None
    check(obj)
    return obj, True


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    if isinstance(body, str) and body:
        return body[:300]
    return str(getattr(e, "message", e))[:300]


# ----------------------------------------------------------------------------- profiles
def profile_dir() -> Path:
    return Path(os.environ.get("PPSEHR_LLM_PROFILE_DIR") or "~/.cache/ppsehr/llm-profiles").expanduser()


def default_profile_path(base_url: str, model: str) -> Path:
    """Where `ppsehr llm check` writes the profile of an endpoint and model (and a release looks for it)."""
    u = urlsplit(base_url)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{u.hostname or 'host'}-{u.port or ''}-{model}")[:80]
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\n{model}".encode()).hexdigest()[:10]
    return profile_dir() / f"{slug}-{digest}.json"


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_profile(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PpsehrError(f"LLM profile {path}: cannot read it ({e})") from None
    if not isinstance(p, dict) or p.get("format") != PROFILE_FORMAT or p.get("version") != PROFILE_VERSION:
        raise PpsehrError(f"LLM profile {path}: not a {PROFILE_FORMAT} version {PROFILE_VERSION} file "
                          "(write one with `ppsehr llm check`)")
    return p


def apply_profile(config: LLMConfig, profile: dict[str, Any], source: str = "") -> LLMConfig:
    """config with the profile's measured settings where config keeps its defaults."""
    if profile.get("base_url", "").rstrip("/") != (config.base_url or "").rstrip("/") or profile.get("model") != config.model:
        raise PpsehrError(f"LLM profile {source or ''} was measured for {profile.get('model')!r} at "
                          f"{urlsplit(profile.get('base_url', '')).hostname!r}, not {config.model!r} at {config.host!r}; "
                          "run `ppsehr llm check` for this endpoint")
    s, sp = profile.get("settings", {}), profile.get("speed", {})
    defaults = LLMConfig()
    changes: dict[str, Any] = {"profile": source or "profile"}
    for key in ("timeout", "max_tokens", "context", "concurrency", "batch_size", "structured", "note_max_tokens"):
        if key in s and s[key] is not None and getattr(config, key) == getattr(defaults, key):
            changes[key] = s[key]
    if not config.completion_tps:
        changes.update(prompt_tps=float(sp.get("prompt_tokens_per_s") or 0), completion_tps=float(sp.get("completion_tokens_per_s") or 0),
                       overhead_s=float(sp.get("overhead_s") or 0))
    if not config.chars_per_token and profile.get("chars_per_token"):
        changes["chars_per_token"] = float(profile["chars_per_token"])
    return config.replace(**changes)


# ----------------------------------------------------------------------------- llm check
_PROBE_TEXT = ("- chol (numeric, unit mg/dL): Serum total cholesterol. Value: number in [80, 620] with 0 decimal(s); "
               '"" if unknown.\n- sex (categorical): Sex recorded at the examination. Value: one of: female, male.\n'
               '{"age": 54, "sex": "male", "cp": "asymptomatic", "trestbps": 130, "chol": 246, "fbs": "no"}\n'
               "- heart_disease given cp = asymptomatic: absent 28%, present 72%\n")


def _models_metadata(client: LLMClient, out: dict[str, Any]) -> int:
    """Context size from the endpoint's model list (vLLM max_model_len, LM Studio/others), 0 if absent."""
    try:
        models = list(client._client.models.list())
    except Exception as e:  # optional endpoint; many servers lack it
        out["models_listed"] = None
        out["models_error"] = type(e).__name__
        return 0
    out["models_listed"] = [m.id for m in models][:50]
    out["model_listed"] = client.config.model in out["models_listed"]
    for m in models:
        if m.id != client.config.model:
            continue
        d = m.model_dump() if hasattr(m, "model_dump") else dict(m)
        for k in ("max_model_len", "context_length", "context_window", "max_context_length", "n_ctx"):
            v = d.get(k) or (d.get("meta") or {}).get(k)
            if isinstance(v, int) and v > 0:
                return v
        v = (d.get("meta") or {}).get("n_ctx_train")
        if isinstance(v, int) and v > 0:
            return v
    return 0


def _props_context(config: LLMConfig) -> int:
    """llama.cpp's server says its context size at /props (next to /v1)."""
    import httpx

    root = (config.base_url or "").rstrip("/")
    root = root[:-3] if root.endswith("/v1") else root
    try:
        r = httpx.get(root + "/props", timeout=5.0, headers={"authorization": f"Bearer {api_key() or 'no-key'}"})
        d = r.json() if r.status_code == 200 else {}
        v = (d.get("default_generation_settings") or {}).get("n_ctx") or d.get("n_ctx")
        return int(v) if isinstance(v, (int, float)) and v > 0 else 0
    except Exception:
        return 0


def _raw(client: LLMClient, messages: list[dict], max_tokens: int, timeout: float, **extra: Any) -> tuple[Any, float]:
    """One bare request (no retries), for measurements: (response or exception, seconds)."""
    t0 = time.perf_counter()
    try:
        resp = client._client.chat.completions.create(model=client.config.model, messages=messages, max_tokens=max_tokens,
                                                     temperature=0.0, seed=0, timeout=timeout, **extra)
    except Exception as e:
        return e, time.perf_counter() - t0
    return resp, time.perf_counter() - t0


def _usage(resp: Any) -> tuple[int, int]:
    u = getattr(resp, "usage", None)
    return (int(u.prompt_tokens or 0), int(u.completion_tokens or 0)) if u is not None else (0, 0)


def _probe_context(client: LLMClient, out: dict[str, Any], cpt: float) -> tuple[int, str]:
    """The context size from what the server answers to prompts too long for common sizes: an overflow
    answer usually names it; a server that truncates says how many prompt tokens it read."""
    for size in (32768, 16384, 8192, 4096, 2048, 1024):
        words = int(size * 1.05)
        text = ("ok " * words).strip()
        resp, secs = _raw(client, [{"role": "user", "content": text + "\nReply with: ok"}], 1, 20.0)
        if isinstance(resp, client._openai.APIStatusError):
            msg = _message(resp)
            if classify(resp.status_code, msg, False) == "overflow":
                ctx, _ = context_from_message(msg, getattr(resp, "body", None))
                if ctx:
                    return ctx, "the endpoint's overflow answer"
                continue  # refused without a number: try the next smaller size
            out["context_probe_error"] = f"HTTP {resp.status_code}: {msg[:160]}"
            return 0, ""
        if isinstance(resp, client._openai.APITimeoutError):
            out["context_probe_note"] = (f"a {size}-token prompt was not refused within 20 s (the server may still be "
                                         "reading it); assuming that size")
            return size, "not refused at this size"
        if isinstance(resp, Exception):
            out["context_probe_error"] = f"{type(resp).__name__}: {str(resp)[:160]}"
            return 0, ""
        p, _ = _usage(resp)
        if p and p < words * 0.9:  # read only part of it: the server truncates to its context
            return p, "prompt tokens the server read of a longer prompt"
        return size, "accepted at this size"
    return 0, ""


def check_endpoint(config: LLMConfig, probe_context: bool = True) -> dict[str, Any]:
    """Connectivity, structured-output support, context size, speed and parallel slots of an endpoint
    (for `ppsehr llm check`); `result["profile"]` is what a release reuses."""
    config = config.replace(cache_dir="", max_retries=min(config.max_retries, 1), structured="auto", time_budget=0)
    out: dict[str, Any] = {"base_url_host": config.host, "model": config.model, "api_key_set": api_key() is not None}
    memory = EndpointMemory()
    client = LLMClient(config, memory=memory)
    meta_ctx = _models_metadata(client, out)
    # 1. chat, and the fixed cost of a request
    tiny = [{"role": "user", "content": "Reply with the single word: ok"}]
    resp, t_tiny = _raw(client, tiny, 4, config.timeout or 300.0)
    if isinstance(resp, Exception):
        try:
            text, rec = client.text(probe_prompt(), max_tokens=50)  # the full loop: classified, retried, explained
        except LLMError as e:
            out.update(chat=False, error=str(e))
            return out
        out.update(chat=True, chat_latency_s=round(rec.latency_s, 3), reply=text[:200])
        t_tiny, p_tiny = rec.latency_s, rec.prompt_tokens
    else:
        content = resp.choices[0].message.content if resp.choices else ""
        out.update(chat=True, chat_latency_s=round(t_tiny, 3), reply=(content or "")[:200])
        p_tiny = _usage(resp)[0]
    # 2. structured output, each mode on its own (the client falls back and says why)
    prompt = probe_prompt()
    for mode in MODES[:3]:
        memory.mode = mode
        try:
            obj, rec = client.json(prompt)
            out[mode] = rec.mode == mode and rec.reasks == 0
            if rec.mode != mode:
                out[f"{mode}_note"] = f"refused by the server ({memory.refusals.get(mode, '')[:160]}); fell back to {rec.mode}"
            elif rec.reasks:
                out[f"{mode}_note"] = f"accepted, but the reply needed {rec.reasks} re-ask(s) to validate"
            else:
                out[f"{mode}_note"] = "reply validated against the schema" + (
                    "" if obj == {"ok": True, "n": 3} else f" (content {json.dumps(obj)[:60]} differs from what was asked)")
        except LLMError as e:
            out[mode] = False
            out[f"{mode}_note"] = str(e)[:200]
        memory.mode = None
        memory.failed.clear()
    out["structured_output"] = next((m for m in MODES[:3] if out.get(m)), "prompt")
    # 3. speed: reading a prompt, writing tokens; characters per token of prompt-like text
    nonce = random.Random().randrange(10 ** 9)
    long_text = f"[{nonce}]\n" + _PROBE_TEXT * 6
    resp, t_read = _raw(client, [{"role": "user", "content": long_text + "\nReply with the single word: ok"}], 2,
                        config.timeout or 600.0)
    speed: dict[str, Any] = {}
    cpt = 0.0
    overhead = min(max(0.0, t_tiny * 0.8), 2.0)  # a slow first answer is slow reading, not fixed cost
    if not isinstance(resp, Exception):
        p_read = _usage(resp)[0]
        if p_read > p_tiny > 0:
            cpt = (len(long_text) - 30) / (p_read - p_tiny)
            speed["prompt_tokens_per_s"] = round((p_read - p_tiny) / max(t_read - t_tiny, 0.05), 1)
    # 3b. writing a structured reply after a long prompt, as the LLM stage does (right after the read probe, so
    # that a server with a prefix cache does not read the prompt again): a grammar and a long context
    # make a small model on a CPU several times slower than the count below (docs/local-model.md)
    mode = out["structured_output"]
    numbers = {"type": "object", "additionalProperties": False, "required": ["numbers"], "properties": {
        "numbers": {"type": "array", "minItems": 40, "maxItems": 60, "items": {"enum": list(range(1, 61))}}}}
    extra: dict[str, Any] = {}
    if mode == "json_schema":
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": numbers, "strict": True}}
    elif mode == "json_object_schema":
        extra["response_format"] = {"type": "json_object", "schema": numbers}
    elif mode == "json_object":
        extra["response_format"] = {"type": "json_object"}
    ask = long_text + '\nReply with the JSON object {"numbers": [1, 2, 3, ...]} listing the whole numbers from 1 to 60.'
    resp, t_struct = _raw(client, [{"role": "user", "content": ask}], 240, config.timeout or 600.0, **extra)
    if not isinstance(resp, Exception):
        p_struct, c_struct = _usage(resp)
        if c_struct > 8:
            # the prompt's start was just read (a server with a prefix cache reads only the last line again);
            # without such a cache this errs slow, which is the safe side for timeouts and batch sizes.
            # Numbers as an enum, as records are sent to grammar-constrained servers
            speed["structured_completion_tokens_per_s"] = round(c_struct / max(t_struct - overhead, 0.05), 2)
            speed["structured_context_tokens"] = p_struct + c_struct
    else:
        speed["structured_probe_error"] = f"{type(resp).__name__}: {str(resp)[:120]}"
    nonce = random.Random().randrange(10 ** 9)
    count = [{"role": "user", "content": f"[{nonce}] Write the numbers from 1 to 100, separated by spaces."}]
    resp, t_write = _raw(client, count, 64, config.timeout or 600.0)
    if not isinstance(resp, Exception):
        _, c_write = _usage(resp)
        if c_write > 4:
            speed["completion_tokens_per_s"] = round(c_write / max(t_write - overhead, 0.05), 2)
    speed["overhead_s"] = round(overhead, 3)
    plain_tps = speed.get("completion_tokens_per_s")
    # 4. parallel slots: two such requests at once take twice as long on a server that serves one at a time
    slots = None
    if speed.get("completion_tokens_per_s"):
        with ThreadPoolExecutor(max_workers=2) as pool:
            t0 = time.perf_counter()
            futs = [pool.submit(_raw, client, [{"role": "user", "content": f"[{nonce + k + 1}] " + count[0]["content"]}], 32,
                                config.timeout or 600.0) for k in range(2)]
            res = [f.result() for f in futs]
            wall = time.perf_counter() - t0
        if not any(isinstance(r, Exception) for r, _ in res):
            single = overhead + max(_usage(r)[1] for r, _ in res) / speed["completion_tokens_per_s"]
            slots = 1 if wall > 1.6 * single else 2
        speed["parallel_slots"] = slots
    if plain_tps and speed.get("structured_completion_tokens_per_s"):  # requests are timed with the slower of the two
        speed["plain_completion_tokens_per_s"] = plain_tps
        speed["completion_tokens_per_s"] = min(plain_tps, speed["structured_completion_tokens_per_s"])
    out["speed"] = speed
    # 5. context size
    ctx, source = (config.context, "configured (--llm-context)") if config.context else (0, "")
    if not ctx and meta_ctx:
        ctx, source = meta_ctx, "the endpoint's model list"
    if not ctx:
        ctx = _props_context(config)
        source = "the server's /props" if ctx else ""
    if not ctx and probe_context:
        ctx, source = _probe_context(client, out, cpt or CHARS_PER_TOKEN)
    out["context_tokens"], out["context_source"] = ctx or None, source or "unknown"
    out["chars_per_token"] = round(cpt, 2) if cpt else None
    out["usage"] = client.usage()
    out["profile"] = make_profile(config, out)
    return out


def make_profile(config: LLMConfig, check: dict[str, Any]) -> dict[str, Any]:
    """The profile a release reuses: what was measured, and the settings that follow from it."""
    sp = check.get("speed", {})
    ctx = check.get("context_tokens") or 0
    slots = sp.get("parallel_slots")
    settings: dict[str, Any] = {
        "structured": check.get("structured_output", "json_schema") if check.get("chat") else "auto",
        "context": ctx,
        "max_tokens": max(256, min(4096, ctx // 2)) if ctx else 4096,
        "concurrency": 1 if slots == 1 else min(config.concurrency, 4),
        "timeout": None,  # per request, from the speeds below
    }
    if sp.get("completion_tokens_per_s"):
        # a batch's reply should take about three minutes to write (the prompt is read once: servers
        # that keep a prefix cache, as llama.cpp does, read only the batch's last line again)
        per_record = 90
        settings["batch_size"] = int(max(4, min(20, 180 * sp["completion_tokens_per_s"] / per_record)))
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_url": (config.base_url or "").rstrip("/"), "model": config.model,
            "structured_output": check.get("structured_output"),
            "capabilities": {"chat": bool(check.get("chat")),
                             **{m: bool(check.get(m)) for m in MODES[:3]},
                             **{f"{m}_note": check.get(f"{m}_note") for m in MODES[:3]}},
            "context_tokens": ctx or None, "context_source": check.get("context_source"),
            "chars_per_token": check.get("chars_per_token"), "speed": sp, "settings": settings}


# ----------------------------------------------------------------------------- command line
def add_llm_options(p, required: bool = False) -> None:
    """--llm-* options (for `demo`, `coordinator release`, `llm check`, `bench llm`)."""
    p.add_argument("--llm-base-url", required=required, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                   "(key from PPSEHR_LLM_API_KEY or OPENAI_API_KEY); without it: statistical engine only")
    p.add_argument("--llm-model", required=required, help="model name at that endpoint")
    p.add_argument("--llm-uses", default="knowledge,notes", help="comma-separated: knowledge, generate, notes (default knowledge,notes)")
    p.add_argument("--llm-language", default=None, help="language of the notes (code or name; default: the dictionary's [llm] language, else en)")
    p.add_argument("--llm-styles", default="rule", help="LLM-first prompt styles, comma-separated: definition, example, rule")
    p.add_argument("--llm-profile", default="auto", metavar="PATH",
                   help="endpoint profile written by `ppsehr llm check` (default: the one it wrote for this endpoint and "
                        "model, if any; 'none': ignore profiles). `llm check` writes it here")
    p.add_argument("--llm-timeout", type=float, default=None,
                   help="seconds per request (default: from the endpoint's measured speed, else 120)")
    p.add_argument("--llm-max-tokens", type=int, default=None, help="cap of any reply, in tokens (default: the profile's, else 4096)")
    p.add_argument("--llm-context", type=int, default=None,
                   help="the model's context size in tokens (default: the profile's, else learnt from the endpoint)")
    p.add_argument("--llm-concurrency", type=int, default=None,
                   help="requests in flight at once (default: the profile's, else 4)")
    p.add_argument("--llm-time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                   help=f"seconds for the whole LLM stage of a release (default {DEFAULT_TIME_BUDGET:g}; 0 = none); "
                        "past it the stage keeps what it has")
    p.add_argument("--llm-notes-limit", type=int, default=None, help="write notes for at most this many records (default: all, within the time budget)")
    p.add_argument("--llm-cache", default=str(Path("~/.cache/ppsehr/llm")), help="response cache directory ('' = none)")
    p.add_argument("--llm-structured", choices=("auto",) + MODES, default="auto", help="structured-output mode (default: the profile's, else detect)")


def llm_config_from_args(args, use_profile: bool = True, **overrides: Any) -> LLMConfig:
    """An LLMConfig from add_llm_options' flags (None base URL = offline), with the endpoint's profile
    (`ppsehr llm check`) where a flag does not say otherwise."""
    flags: dict[str, Any] = {}
    for flag, key in (("llm_timeout", "timeout"), ("llm_max_tokens", "max_tokens"), ("llm_context", "context"),
                      ("llm_concurrency", "concurrency"), ("llm_notes_limit", "notes_limit")):
        v = getattr(args, flag, None)
        if v is not None:
            flags[key] = v
    cfg = LLMConfig(base_url=args.llm_base_url or None, model=args.llm_model or None, cache_dir=args.llm_cache,
                    structured=args.llm_structured, uses=tuple(u.strip() for u in args.llm_uses.split(",") if u.strip()),
                    styles=tuple(s.strip() for s in args.llm_styles.split(",") if s.strip()),
                    language=args.llm_language, time_budget=getattr(args, "llm_time_budget", DEFAULT_TIME_BUDGET),
                    **{**flags, **overrides})
    cfg.check()
    if use_profile and cfg.enabled:
        choice = getattr(args, "llm_profile", "auto") or "auto"
        if choice not in ("none", "off"):
            path = default_profile_path(cfg.base_url, cfg.model) if choice == "auto" else Path(choice).expanduser()
            if path.exists():
                cfg = apply_profile(cfg, load_profile(path), str(path))
                # a flag given on the command line wins over the profile
                cfg = cfg.replace(**flags, **overrides)
            elif choice != "auto":
                raise PpsehrError(f"LLM profile {path} does not exist; write it with `ppsehr llm check ... --llm-profile {path}`")
        cfg.check()
    return cfg


def run_check_cli(args) -> int:
    """`ppsehr llm check`: connectivity, structured output, context, speed; writes the endpoint's profile.
    Exit 1 if chat does not work."""
    cfg = llm_config_from_args(args, use_profile=False, max_retries=1)
    result = check_endpoint(cfg, probe_context=not getattr(args, "no_context_probe", False))
    written = None
    if result.get("chat"):
        choice = getattr(args, "llm_profile", "auto") or "auto"
        if choice not in ("none", "off"):
            path = default_profile_path(cfg.base_url, cfg.model) if choice == "auto" else Path(choice)
            written = write_profile(result["profile"], path)
            result["profile_path"] = str(written)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        def line(label: str, text: str) -> None:
            print(f"  {label + ':':<20} {text}")

        print(f"endpoint {result['base_url_host']}, model {result['model']} "
              f"(API key {'from the environment' if result['api_key_set'] else 'not set'})")
        listed = result.get("models_listed")
        line("models listed", "not available" if listed is None else ", ".join(listed[:10]) or "none")
        line("chat completions", "ok (%.2f s)" % result["chat_latency_s"] if result.get("chat")
             else "FAILED: " + result.get("error", ""))
        if result.get("chat"):
            for mode in MODES[:3]:
                line(mode, f"{'supported' if result[mode] else 'no'} ({result[f'{mode}_note']})")
            line("structured output", result["structured_output"])
            sp = result.get("speed", {})
            line("context", f"{result.get('context_tokens') or 'unknown'} tokens ({result.get('context_source')})")
            writes = (f"writes {sp.get('completion_tokens_per_s', '?')} tokens/s" + (
                f" ({sp['structured_completion_tokens_per_s']} structured after {sp.get('structured_context_tokens')} tokens, "
                f"{sp['plain_completion_tokens_per_s']} plain)" if sp.get("plain_completion_tokens_per_s") else ""))
            line("speed", f"reads {sp.get('prompt_tokens_per_s', '?')} tokens/s, {writes}, "
                          f"{sp.get('parallel_slots') or '?'} request(s) at once")
            s = result["profile"]["settings"]
            line("release settings", f"context {s['context'] or 'unknown'}, max_tokens {s['max_tokens']}, concurrency "
                                     f"{s['concurrency']}, batch {s.get('batch_size', 'default')}, timeout per request from the speed")
            if written:
                line("profile written", f"{written} (releases with this endpoint and model use it; --llm-profile PATH)")
    return 0 if result.get("chat") else 1
