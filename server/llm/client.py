"""A client for any OpenAI-compatible Chat Completions endpoint (vLLM, Ollama, llama.cpp, hosted APIs).

Built on the `openai` package with its own retry loop (exponential backoff with jitter on 429,
5xx, timeouts and connection errors, honouring Retry-After), a concurrency limit, fixed
temperature/seed/max tokens, and structured output: JSON Schema through `response_format`
where the server supports it, else the schema spelled out in the prompt; either way the reply
is parsed and validated, and re-asked a bounded number of times with the error. Every call's
token usage and latency is recorded. Replies are cached on disk keyed by a hash of the request,
so a rerun costs nothing. After a few consecutive calls fail to reach the endpoint at all, the
client stops trying (no release waits on a dead endpoint).

The API key comes from PPSEHR_LLM_API_KEY or OPENAI_API_KEY and is never stored in the config,
the cache, logs, messages or the release.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlsplit

from ...common.errors import PpsehrError
from .prompts import Prompt, probe_prompt, validate_schema

KEY_VARIABLES = ("PPSEHR_LLM_API_KEY", "OPENAI_API_KEY")
MODES = ("json_schema", "json_object", "prompt")
T = TypeVar("T")
R = TypeVar("R")


class LLMError(PpsehrError):
    """An LLM call failed for good (after retries / re-asks), or the endpoint is unusable."""


@dataclass(frozen=True)
class LLMConfig:
    """LLM settings of a release. base_url/model None = offline (statistical engine only).

    uses: which uses run ("knowledge", "generate", "notes"). generate_rows: records to generate
    LLM-first (0 = the release's row count); generate_output "file" adds them as llm_records.csv,
    "records" makes them the release's records. cache_dir "" disables the response cache.
    """

    base_url: str | None = None
    model: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    backoff_max: float = 30.0
    concurrency: int = 4
    temperature: float = 0.7
    seed: int = 0
    max_tokens: int = 4096
    note_max_tokens: int = 300
    reask: int = 2
    structured: str = "auto"  # auto | json_schema | json_object | prompt
    cache_dir: str = str(Path("~/.cache/ppsehr/llm"))
    uses: tuple[str, ...] = ("knowledge", "notes")
    language: str | None = None  # None: the dictionary's [llm] language, else "en"
    styles: tuple[str, ...] = ("rule",)
    batch_size: int = 20
    generate_rows: int = 0
    pool_factor: float = 1.5
    generate_output: str = "file"  # file | records
    notes_limit: int | None = None
    example_rows: int = 8
    fail_fast_after: int = 6

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

    def check(self) -> None:
        if bool(self.base_url) != bool(self.model):
            raise PpsehrError("LLM: give both --llm-base-url and --llm-model (or neither for a statistical-engine-only release)")
        if self.base_url and urlsplit(self.base_url).scheme not in ("http", "https"):
            raise PpsehrError(f"--llm-base-url must be an http(s) URL, got {self.base_url!r}")
        for u in self.uses:
            if u not in ("knowledge", "generate", "notes"):
                raise PpsehrError(f"LLM: unknown use {u!r} (knowledge, generate, notes)")
        if self.structured not in ("auto",) + MODES:
            raise PpsehrError(f"LLM: structured must be auto, json_schema, json_object or prompt, got {self.structured!r}")
        if self.generate_output not in ("file", "records"):
            raise PpsehrError(f"LLM: generate_output must be 'file' or 'records', got {self.generate_output!r}")
        if self.concurrency < 1 or self.batch_size < 1 or self.max_retries < 0 or self.reask < 0:
            raise PpsehrError("LLM: concurrency and batch_size must be >= 1, max_retries and reask >= 0")


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


class LLMClient:
    """Calls one endpoint/model. Thread-safe; `map` runs calls concurrently within the limit."""

    def __init__(self, config: LLMConfig, sleep: Callable[[float], None] = time.sleep):
        import openai

        config.check()
        if not config.enabled:
            raise LLMError("no LLM endpoint configured")
        self.config = config
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=api_key() or "no-key", timeout=config.timeout,
                                     max_retries=0)
        self._sleep = sleep
        self._sem = threading.Semaphore(config.concurrency)
        self._lock = threading.Lock()
        self.calls: list[CallRecord] = []
        self.mode: str | None = None if config.structured == "auto" else config.structured
        self.mode_history: list[str] = []
        self._unreachable = 0
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None

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

    def json(self, prompt: Prompt, validate: Callable[[Any], None] | None = None) -> tuple[Any, CallRecord]:
        """A JSON reply that validates (against the prompt's schema, or with `validate`), re-asked if needed."""
        if prompt.schema_json is None:
            raise ValueError("json() needs a prompt with a schema")
        schema = prompt.schema
        check = validate or (lambda obj: validate_schema(obj, schema))
        rec = CallRecord(prompt.template.id, prompt.hash)
        key = self._key(prompt, None)
        hit = self._cached(key, rec)
        if hit is not None:
            try:
                obj = extract_json(hit)
                check(obj)
                return obj, rec
            except ValueError:
                rec.cached = rec.ok = False  # stale or foreign entry: ask again
        obj, content = self._timed(rec, lambda: self._json_call(prompt, check, rec))
        self._store(key, content, rec)
        return obj, rec

    def _timed(self, rec: CallRecord, call: Callable[[], T]) -> T:
        """Run one (possibly re-asked) call; record its latency and outcome whether it succeeds or not."""
        t0 = time.perf_counter()
        try:
            out = call()
            rec.ok = True
            return out
        finally:
            rec.latency_s = time.perf_counter() - t0
            self._record(rec)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """fn over items, up to `concurrency` at a time, results in order (exceptions re-raised)."""
        items = list(items)
        if len(items) <= 1 or self.config.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(fn, items))

    def usage(self) -> dict[str, Any]:
        with self._lock:
            calls = list(self.calls)
        return {"calls": len(calls), "requests": sum(c.requests for c in calls),
                "cached_calls": sum(c.cached for c in calls), "failed_calls": sum(not c.ok for c in calls),
                "reasks": sum(c.reasks for c in calls),
                "prompt_tokens": sum(c.prompt_tokens for c in calls),
                "completion_tokens": sum(c.completion_tokens for c in calls),
                "usage_reported": all(c.usage_reported for c in calls if not c.cached),
                "latency_s": round(sum(c.latency_s for c in calls), 3),
                "structured_output": self.mode or "not determined"}

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

    def _json_call(self, prompt: Prompt, check: Callable[[Any], None], rec: CallRecord) -> tuple[Any, str]:
        while True:
            mode = self.mode or "json_schema"
            messages = prompt.chat_messages(schema_in_prompt=mode != "json_schema")
            try:
                content = self._request(messages, mode, prompt, rec)
            except _Unsupported:
                self._downgrade(mode)
                continue
            rec.mode = mode
            if self.mode is None:
                self._set_mode(mode)
            for attempt in range(self.config.reask + 1):
                try:
                    obj = extract_json(content)
                    check(obj)
                    return obj, content
                except ValueError as e:
                    if attempt == self.config.reask:
                        raise LLMError(f"{prompt.template.id}: no valid JSON after {self.config.reask} re-ask(s): {e}") from None
                    rec.reasks += 1
                    messages = messages + [
                        {"role": "assistant", "content": content[:4000]},
                        {"role": "user", "content": f"That reply is not valid: {str(e)[:300]}. Reply again with only the "
                                                    "corrected JSON object, satisfying the schema."}]
                    content = self._request(messages, mode, prompt, rec)

    def _set_mode(self, mode: str) -> None:
        with self._lock:
            if self.mode is None:
                self.mode = mode
                self.mode_history.append(mode)

    def _downgrade(self, failed: str) -> None:
        with self._lock:
            nxt = MODES[min(MODES.index(failed) + 1, len(MODES) - 1)]
            if self.mode is None or MODES.index(self.mode) <= MODES.index(failed):
                self.mode = nxt
                self.mode_history.append(nxt)

    def _request(self, messages: list[dict], mode: str | None, prompt: Prompt, rec: CallRecord,
                 max_tokens: int | None = None) -> str:
        c = self.config
        oa = self._openai
        kwargs: dict[str, Any] = {"model": c.model, "messages": messages, "temperature": c.temperature,
                                  "seed": c.seed + prompt.seed_offset, "max_tokens": max_tokens or c.max_tokens}
        if mode == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": prompt.schema_name or "reply", "schema": prompt.schema, "strict": True}}
        elif mode == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        attempt = 0
        while True:
            if self._unreachable >= c.fail_fast_after:
                raise LLMError(f"the LLM endpoint {c.host} did not answer {self._unreachable} requests in a row; giving up")
            rec.requests += 1
            try:
                with self._sem:
                    resp = self._client.chat.completions.create(**kwargs)
            except (oa.BadRequestError, oa.UnprocessableEntityError) as e:
                if mode in ("json_schema", "json_object"):
                    raise _Unsupported() from None
                raise LLMError(f"{prompt.template.id}: the endpoint refused the request ({e.status_code}): {_message(e)}") from None
            except (oa.AuthenticationError, oa.PermissionDeniedError) as e:
                raise LLMError(f"the endpoint {c.host} refused the API key ({e.status_code}); set PPSEHR_LLM_API_KEY") from None
            except oa.NotFoundError as e:
                raise LLMError(f"the endpoint {c.host} has no model {c.model!r} or no chat completions API (404): {_message(e)}") from None
            except oa.APIConnectionError as e:  # includes APITimeoutError
                with self._lock:
                    self._unreachable += 1
                what = "timed out" if isinstance(e, oa.APITimeoutError) else "unreachable"
                if attempt >= c.max_retries:
                    raise LLMError(f"{prompt.template.id}: {what} after {attempt + 1} attempt(s)") from None
            except oa.APIStatusError as e:
                with self._lock:
                    self._unreachable = 0
                if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    raise LLMError(f"{prompt.template.id}: HTTP {e.status_code}: {_message(e)}") from None
                if attempt >= c.max_retries:
                    raise LLMError(f"{prompt.template.id}: HTTP {e.status_code} after {attempt + 1} attempt(s)") from None
                self._sleep(self._delay(attempt, e))
                attempt += 1
                continue
            except oa.OpenAIError as e:  # anything else the client raises (e.g. an unparseable response)
                raise LLMError(f"{prompt.template.id}: {type(e).__name__}: {str(e)[:200]}") from None
            else:
                if not hasattr(resp, "choices"):
                    raise LLMError(f"{prompt.template.id}: the endpoint did not answer with a chat completion")
                with self._lock:
                    self._unreachable = 0
                usage = getattr(resp, "usage", None)
                if usage is not None:
                    rec.prompt_tokens += int(usage.prompt_tokens or 0)
                    rec.completion_tokens += int(usage.completion_tokens or 0)
                else:
                    rec.usage_reported = False
                choice = resp.choices[0] if resp.choices else None
                content = choice.message.content if choice is not None and choice.message is not None else None
                return content or ""
            self._sleep(self._delay(attempt, None))
            attempt += 1

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
    """The server refused a structured-output request: try the next mode."""


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    return str(getattr(e, "message", e))[:300]


def check_endpoint(config: LLMConfig) -> dict[str, Any]:
    """Connectivity and structured-output support of an endpoint (for `ppsehr llm check`)."""
    config = LLMConfig(**{**config.to_dict(), "cache_dir": "", "max_retries": min(config.max_retries, 1),
                          "structured": "auto", "uses": tuple(config.uses), "styles": tuple(config.styles)})
    out: dict[str, Any] = {"base_url_host": config.host, "model": config.model, "api_key_set": api_key() is not None}
    client = LLMClient(config)
    try:
        models = [m.id for m in client._client.models.list()]
        out["models_listed"] = models[:50]
        out["model_listed"] = config.model in models
    except Exception as e:  # optional endpoint; many servers lack it
        out["models_listed"] = None
        out["models_error"] = type(e).__name__
    prompt = probe_prompt()
    try:
        text, rec = client.text(prompt, max_tokens=50)
        out.update(chat=True, chat_latency_s=round(rec.latency_s, 3), reply=text[:200])
    except LLMError as e:
        out.update(chat=False, error=str(e))
        return out
    for mode in ("json_schema", "json_object"):
        client.mode = mode
        try:
            obj, rec = client.json(prompt)
            out[mode] = rec.mode == mode and rec.reasks == 0
            if rec.mode != mode:
                out[f"{mode}_note"] = f"refused by the server; fell back to {rec.mode}"
            elif rec.reasks:
                out[f"{mode}_note"] = f"accepted, but the reply needed {rec.reasks} re-ask(s) to validate"
            else:
                out[f"{mode}_note"] = "reply validated against the schema" + (
                    "" if obj == {"ok": True, "n": 3} else f" (content {json.dumps(obj)[:60]} differs from what was asked)")
        except LLMError as e:
            out[mode] = False
            out[f"{mode}_note"] = str(e)[:200]
        client.mode = None
    out["structured_output"] = "json_schema" if out.get("json_schema") else ("json_object" if out.get("json_object") else "prompt")
    out["usage"] = client.usage()
    return out


# ----------------------------------------------------------------------------- command line
def add_llm_options(p, required: bool = False) -> None:
    """--llm-* options (for `demo`, `coordinator release`, `llm check`, `bench llm`)."""
    p.add_argument("--llm-base-url", required=required, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                   "(key from PPSEHR_LLM_API_KEY or OPENAI_API_KEY); without it: statistical engine only")
    p.add_argument("--llm-model", required=required, help="model name at that endpoint")
    p.add_argument("--llm-uses", default="knowledge,notes", help="comma-separated: knowledge, generate, notes (default knowledge,notes)")
    p.add_argument("--llm-language", default=None, help="language of the notes (code or name; default: the dictionary's [llm] language, else en)")
    p.add_argument("--llm-styles", default="rule", help="LLM-first prompt styles, comma-separated: definition, example, rule")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--llm-concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--llm-cache", default=str(Path("~/.cache/ppsehr/llm")), help="response cache directory ('' = none)")
    p.add_argument("--llm-structured", choices=("auto",) + MODES, default="auto", help="structured-output mode (default: detect)")


def llm_config_from_args(args, **overrides: Any) -> LLMConfig:
    """An LLMConfig from add_llm_options' flags (None base URL = offline)."""
    cfg = LLMConfig(base_url=args.llm_base_url or None, model=args.llm_model or None, timeout=args.llm_timeout,
                    concurrency=args.llm_concurrency, cache_dir=args.llm_cache, structured=args.llm_structured,
                    uses=tuple(u.strip() for u in args.llm_uses.split(",") if u.strip()),
                    styles=tuple(s.strip() for s in args.llm_styles.split(",") if s.strip()),
                    language=args.llm_language, **overrides)
    cfg.check()
    return cfg


def run_check_cli(args) -> int:
    """`ppsehr llm check`: connectivity and structured-output support; exit 1 if chat does not work."""
    result = check_endpoint(llm_config_from_args(args, max_retries=1))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(f"endpoint {result['base_url_host']}, model {result['model']} "
              f"(API key {'from the environment' if result['api_key_set'] else 'not set'})")
        listed = result.get("models_listed")
        print(f"  models listed:    {'not available' if listed is None else ', '.join(listed[:10]) or 'none'}")
        print(f"  chat completions: {'ok (%.2f s)' % result['chat_latency_s'] if result.get('chat') else 'FAILED: ' + result.get('error', '')}")
        if result.get("chat"):
            for mode in ("json_schema", "json_object"):
                print(f"  {mode + ':':<17} {'supported' if result[mode] else 'no'} ({result[f'{mode}_note']})")
            print(f"  structured output will use: {result['structured_output']}")
    return 0 if result.get("chat") else 1
