"""A teacher behind an inference server: vLLM (or a server that speaks its dialect of the OpenAI completions API,
`prompt_logprobs`). The caching pass sends the server its windows as token ids and stores the top-k log-probs it
returns, through the same writer and verify as an in-process teacher (kd/cache/build.py); the server can run the
teacher the way only servers can (tensor and expert parallel over GPUs and nodes), kd keeps the cache's guarantees.

One request asks for `max_tokens: 1` with `prompt_logprobs: k` and `logprobs: k` for a list of prompts (token ids).
For a prompt x_0 .. x_{n-1}, vLLM's prompt_logprobs[t] (t >= 1) is the distribution of x_t given x_<t: the top-k
plus x_t itself, keyed by token id, each with its log-prob and rank. kd's position t holds the distribution of
the NEXT token, so kd position t = prompt_logprobs[t + 1] for t < n - 1, and the last position's is the generated
token's `logprobs` (its top-k; ids as `token_id:N` with `return_tokens_as_token_ids`). Log-probs are those of the
full softmax at temperature 1, as vLLM's default `logprobs_mode` (raw logprobs) returns them. A chat window of
several conversations is sent as one prompt per conversation: the server attends within each, as the in-process
pass's restarted position ids do.

What a server cannot give is refused before any work (ServedTeacher.check): hidden states (not in the API) and
sampled targets (kd draws from the full distribution; the server returns only its top-k).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kd.errors import KDError
from kd.io import json_sha256
from kd.teacher import TeacherTargets

# A text tokenized by kd and by the server: tokenizers that disagree on it are refused (letters, digits, spaces,
# punctuation, accents, CJK and an emoji, so that a byte-level BPE and a SentencePiece vocabulary part ways).
PROBE_TEXT = (
    "To be, or not to be: that is the question.\n  Whether 'tis nobler in the mind (1603) to suffer\t"
    "the slings & arrows of outrageous fortune — café, naïve, 東京, Ωμέγα 🙂 <|endoftext|> end."
)

# Errors after which the same request may succeed (the server restarting, overloaded, a dropped connection)
RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass
class ServedModel:
    """What the server says it serves (GET /v1/models, GET /version): the served teacher's identity in the cache."""

    model: str  # the name requests use
    root: str | None  # where the server loaded it from (vLLM: the folder or hub id)
    max_model_len: int | None
    server_version: str | None
    hosts: list[str]

    def record(self) -> dict:
        """The cache's record of the teacher, in place of an in-process teacher's weight files: what the server
        serves and where it loaded it from. Every shard carries it and its digest is part of the cache's identity,
        so it holds nothing that differs between servers of the same model (hosts, the server's version, its
        context): the same model served elsewhere, or by an upgraded server, resumes the cache. The servers' URLs
        are in the recorded config (teacher.server.url)."""
        record = {"kind": "served", "model": self.model, "root": self.root}
        record["digest"] = json_sha256(record)
        return record

    def describe(self) -> str:
        return (
            f"{self.model} (loaded from {self.root}, context {self.max_model_len}) served by "
            f"{'vLLM ' + self.server_version if self.server_version else 'a server'} at {', '.join(self.hosts)}"
        )


class Client:
    """JSON over HTTP to one or more servers (the stdlib's urllib: no dependency). A request that fails in a way that
    may pass (connection refused or reset, a timeout, HTTP 429/5xx) is retried with exponential backoff, each try on
    the next server of the list; any other HTTP error is the caller's (a ServerRefused with the server's message)."""

    def __init__(self, urls: list[str], timeout_s: float, retries: int, backoff_s: float, start: int = 0):
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._next, self._lock = start, threading.Lock()

    def _pick(self) -> str:
        with self._lock:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
        return url

    def call(self, path: str, body: dict | None = None, url: str | None = None) -> dict:
        """GET (body None) or POST `path`; on `url`, or on the servers in turn."""
        last, data = None, None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            base = url or self._pick()
            req = urllib.request.Request(
                base + path, data=data, headers={"Content-Type": "application/json"} if data else {}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in RETRY_STATUS:
                    raise ServerRefused(base + path, e.code, detail) from None
                last = f"HTTP {e.code} from {base}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                last = f"{base}: {getattr(e, 'reason', None) or e!r}"
            except json.JSONDecodeError as e:
                last = f"{base}{path} answered something that is not JSON ({e})"
            if attempt < self.retries:
                time.sleep(min(self.backoff_s * 2**attempt, 30.0))
        raise KDError(
            f"the teacher server did not answer {path} after {self.retries + 1} tries (last: {last}). Check that it "
            f"is running and reachable (GET {self.urls[0]}/health), or raise teacher.server.retries / timeout_s"
        )


class ServerRefused(KDError):
    """An HTTP error that a retry will not mend (the request itself is refused)."""

    def __init__(self, where: str, code: int, detail: str):
        super().__init__(f"the teacher server refused {where} (HTTP {code}): {detail}")
        self.code, self.detail = code, detail


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace")
    except Exception:  # a body that cannot be read says nothing more than the status
        return str(e.reason)
    try:  # vLLM: {"error": {"message": ...}} (or {"message": ...} in older versions)
        j = json.loads(body)
        msg = j.get("error", j)
        return str(msg.get("message", msg) if isinstance(msg, dict) else msg)[:500]
    except (json.JSONDecodeError, AttributeError):
        return body[:500]


def connect(server, process_index: int = 0) -> tuple[Client, ServedModel]:
    """Ask every server what it serves; all must serve the same model (the one named by teacher.server.model, or
    their only one)."""
    urls = [server.url] if isinstance(server.url, str) else list(server.url)
    bad = [u for u in urls if urllib.parse.urlparse(u).scheme not in ("http", "https")]
    if bad or not urls:
        raise KDError(f"teacher.server.url {bad or urls} is not an http(s):// URL (e.g. http://127.0.0.1:8000)")
    client = Client(urls, server.timeout_s, server.retries, server.backoff_s, start=process_index)
    served = []
    for url in client.urls:
        try:
            models = client.call("/v1/models", url=url).get("data") or []
        except ServerRefused as e:
            raise KDError(f"{url} is not an OpenAI-compatible server (GET /v1/models: HTTP {e.code})") from None
        names = [m.get("id") for m in models]
        name = server.model or (names[0] if len(names) == 1 else None)
        if name is None or name not in names:
            raise KDError(
                f"{url} serves {names or 'no model'}: set teacher.server.model to the served model's name"
                if server.model is None
                else f"{url} does not serve teacher.server.model={server.model!r}; it serves {names}"
            )
        m = models[names.index(name)]
        try:
            version = client.call("/version", url=url).get("version")
        except ServerRefused:  # not every server has it: the model's name and root still identify it
            version = None
        served.append(
            ServedModel(name, m.get("root"), m.get("max_model_len"), version, [urllib.parse.urlparse(url).netloc])
        )
    first = served[0]
    for url, s in zip(client.urls[1:], served[1:]):
        if (s.model, s.root) != (first.model, first.root):
            raise KDError(
                f"the servers of teacher.server.url serve different models: {client.urls[0]} {first.model} "
                f"({first.root}), {url} {s.model} ({s.root}); point kd at servers of one teacher"
            )
    first.hosts = [h for s in served for h in s.hosts]
    return client, first


@dataclass
class ServedTargets:
    """One prompt's answer: kd's positions 0 .. n-1 (n = the prompt's tokens)."""

    topk_ids: np.ndarray  # [n, k] int64, by descending log-prob
    topk_logprobs: np.ndarray  # [n, k] fp32
    target_logprobs: np.ndarray  # [n - 1] fp32: log p(x_{t+1}) at position t


def _top(entries: list[tuple[int, float]], k: int, vocab_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely of (id, logprob) entries, by descending log-prob (ties: by id)."""
    if len(entries) < k:
        raise KDError(
            f"the teacher server returned {len(entries)} log-probs at {where}, fewer than cache.top_k={k}: is it "
            f"capped (vLLM: --max-logprobs)?"
        )
    entries = sorted(entries, key=lambda e: (-e[1], e[0]))[:k]
    ids = np.fromiter((i for i, _ in entries), np.int64, k)
    if ids.max() >= vocab_size or ids.min() < 0:
        raise KDError(
            f"the teacher server returned token id {int(ids.max())} at {where}, outside the teacher's vocabulary "
            f"({vocab_size} tokens): it serves another model than teacher.model describes"
        )
    return ids, np.fromiter((lp for _, lp in entries), np.float64, k).astype(np.float32)


def parse_choice(choice: dict, prompt: list[int], k: int, vocab_size: int) -> ServedTargets:
    """One choice of a completions response (vLLM's shape, module docstring) -> ServedTargets."""
    n = len(prompt)
    plp = choice.get("prompt_logprobs")
    gen = (choice.get("logprobs") or {}).get("top_logprobs")
    if plp is None or len(plp) != n or not gen:
        raise KDError(
            "the teacher server's answer has no per-position log-probs for the prompt (prompt_logprobs "
            f"{'missing' if plp is None else f'of {len(plp)} positions for {n} tokens'}"
            f"{', no log-probs for the generated token' if not gen else ''}): is it vLLM (or speaking its dialect)?"
        )
    ids = np.empty((n, k), np.int64)
    lps = np.empty((n, k), np.float32)
    target = np.empty(max(n - 1, 0), np.float32)
    for t in range(n - 1):
        d = plp[t + 1]
        ids[t], lps[t] = _top([(int(i), float(v["logprob"])) for i, v in d.items()], k, vocab_size, f"position {t}")
        actual = d.get(str(prompt[t + 1]))
        if actual is None:
            raise KDError(f"the teacher server's prompt log-probs at position {t + 1} lack the prompt's own token")
        target[t] = actual["logprob"]
    last = gen[0]
    entries = []
    for key, v in last.items():
        if not key.startswith("token_id:"):
            raise KDError(
                f"the teacher server keyed a log-prob by {key!r}, not by token id: it ignored "
                "return_tokens_as_token_ids (a vLLM option); serve the teacher with vLLM"
            )
        entries.append((int(key[len("token_id:") :]), float(v)))
    ids[n - 1], lps[n - 1] = _top(entries, k, vocab_size, f"position {n - 1}")
    return ServedTargets(ids, lps, target)


def request_body(model: str, prompts: list[list[int]], k: int) -> dict:
    """The completions request for `prompts` (token ids): one generated token, whose log-probs give the last
    position's distribution, greedy so that it costs nothing to pick."""
    return {
        "model": model,
        "prompt": prompts,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
        "add_special_tokens": False,
    }


class ServedTeacher:
    """The caching pass's teacher when it is served (teacher.server): `check` before any heavy work, `record` for the
    cache's identity, `targets` for a list of prompts, `map` for many requests in flight."""

    def __init__(self, cfg, tokenizer, vocab_size: int, process_index: int = 0):
        self.cfg, self.tokenizer, self.vocab_size = cfg, tokenizer, vocab_size
        self.server = cfg.teacher.server
        self.client, self.served = connect(self.server, process_index)

    def check(self) -> None:
        """What a server cannot give, then the served model against kd's description of the teacher: its context,
        its tokenizer (both tokenize a probe text), its top-k limit (one small request)."""
        cfg, model = self.cfg, self.served.model
        if cfg.cache.sample_n:
            raise KDError(
                "cache.sample_n needs the teacher's full distribution at each position, and a served teacher returns "
                "only its top-k: set cache.sample_n=0 for a served teacher (or run it in process)"
            )
        if cfg.cache.hidden_layers:
            raise KDError(
                "cache.hidden_layers needs the teacher's hidden states, which an inference server does not return: "
                "set cache.hidden_layers=[] for a served teacher (or run it in process)"
            )
        if self.served.max_model_len is not None and cfg.data.seq_len + 1 > self.served.max_model_len:
            raise KDError(
                f"data.seq_len={cfg.data.seq_len} plus the one generated token is longer than the server's context "
                f"(max_model_len {self.served.max_model_len}); lower data.seq_len or serve a longer context"
            )
        mine = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            theirs = self.client.call(
                "/tokenize", {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False}
            ).get("tokens")
        except ServerRefused as e:
            raise KDError(
                f"the teacher server cannot tokenize (POST /tokenize: HTTP {e.code}), so kd cannot check that "
                "teacher.model's tokenizer is the served model's: serve it with vLLM (or a server with /tokenize)"
            ) from None
        if theirs != mine:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise KDError(
                f"teacher.model's tokenizer ({self.cfg.teacher.model}) is not the served model's ({model}): they "
                f"tokenize a probe text differently from token {at} on ({mine[at : at + 4]} vs {theirs[at : at + 4]}). "
                "Point teacher.model at the served model's folder or hub id (its config and tokenizer suffice)"
            )
        try:
            self.targets([mine[:8]])
        except ServerRefused as e:
            raise KDError(
                f"the teacher server refuses cache.top_k={cfg.cache.top_k} log-probs per position ({e.detail}). "
                f"Start it with a larger limit (vLLM: --max-logprobs {cfg.cache.top_k}) or lower cache.top_k"
            ) from None

    def targets(self, prompts: list[list[int]]) -> list[ServedTargets]:
        k = self.cfg.cache.top_k
        answer = self.client.call("/v1/completions", request_body(self.served.model, prompts, k))
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise KDError(f"the teacher server answered {len(choices)} prompts of {len(prompts)}")
        return [parse_choice(c, p, k, self.vocab_size) for c, p in zip(choices, prompts)]

    def run(self, work, chat: bool):
        """`work`: (job, windows w as kd.data.ingest.WindowIndex.read gives them, s, e) items -> (item,
        TeacherTargets of windows [s, e)) in order: one request per item, up to teacher.server.concurrency in
        flight."""
        T = self.cfg.data.seq_len

        def requests():
            for item in work:
                _, w, s, e = item
                spans = window_prompts(w, s, e, chat)
                yield (item, spans), [w["input_ids"][i, a:b].astype(np.int64).tolist() for i, a, b in spans]

        for (item, spans), answers in self.map(requests()):
            yield item, assemble(spans, answers, item[2], item[3], T, self.cfg.cache.top_k)

    def map(self, requests):
        """`requests`: an iterable of (key, prompts); yields (key, [ServedTargets]) in the same order, with up to
        teacher.server.concurrency requests in flight (back-pressure: the next is sent when the oldest is taken)."""
        depth = self.server.concurrency
        with ThreadPoolExecutor(depth, thread_name_prefix="kd-served") as pool:
            pending: deque = deque()
            try:
                for key, prompts in requests:
                    pending.append((key, pool.submit(self.targets, prompts)))
                    if len(pending) >= depth:
                        key0, fut = pending.popleft()
                        yield key0, fut.result()
                while pending:
                    key0, fut = pending.popleft()
                    yield key0, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()


def window_prompts(w: dict, s: int, e: int, chat: bool) -> list[tuple[int, int, int]]:
    """The prompts of windows [s, e) as (window, start, end): a text window's valid tokens; a chat window's
    conversations (runs of one segment id; segment 0 is padding), each its own prompt."""
    spans = []
    for i in range(s, e):
        n = int(w["lengths"][i])
        if not chat:
            spans.append((i, 0, n))
            continue
        seg = np.asarray(w["segments"][i][:n])
        cuts = np.flatnonzero(seg[1:] != seg[:-1]) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
            if seg[a] != 0:
                spans.append((i, int(a), int(b)))
    return spans


def assemble(spans, answers: list[ServedTargets], s: int, e: int, T: int, k: int) -> TeacherTargets:
    """Per-prompt answers -> the windows' [n, T, k] targets. Positions no prompt covers (padding) repeat the last
    covered one: finite, ordered values the loss never reads (it masks by length)."""
    n = e - s
    ids = np.zeros((n, T, k), np.int64)
    lps = np.zeros((n, T, k), np.float32)
    target = np.full((n, T), np.nan, np.float32)  # unscored where no prompt gives it (a conversation's last token)
    covered = np.zeros((n, T), bool)
    for (i, a, b), got in zip(spans, answers):
        ids[i - s, a:b], lps[i - s, a:b] = got.topk_ids, got.topk_logprobs
        target[i - s, a : b - 1] = got.target_logprobs
        covered[i - s, a:b] = True
    for r in range(n):
        last = np.flatnonzero(covered[r])
        if len(last) and last[-1] < T - 1:
            ids[r, last[-1] + 1 :], lps[r, last[-1] + 1 :] = ids[r, last[-1]], lps[r, last[-1]]
    return TeacherTargets(topk_logprobs=lps, topk_ids=ids, target_logprobs=target)
