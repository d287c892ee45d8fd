"""Load test of `llama-lora serve`: aggregate tokens/s and latency at 1, 4 and 16 concurrent clients.

Starts the real server in a subprocess on loopback (one run, default: the latest finished run under
outputs/, e.g. from `make quickstart`), then for each concurrency C runs C client threads with the
official `openai` client, each sending --requests chat completions of exactly --max-tokens tokens
(`ignore_eos`, so every request costs the same), and reports tokens/s, the ratio to 1 client, p50/p99
latency and lost requests. Results go to benchmarks/results/serve_load.json and benchmarks/README.md.

  python benchmarks/serve_load.py                          # outputs/<latest run>, 1/4/16 clients
  python benchmarks/serve_load.py outputs/qs --requests 20 --max-tokens 64 --max-batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: str | None, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "llama_lora.cli", "serve", *([run] if run else []), "--port", str(port),
            "--max-batch", str(max_batch), "--queue-size", "256"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve did not start")


def load(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies, tokens, lost = [], [], []

    def one():
        for _ in range(requests):
            t = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Reverse the word.\n\ngarden"}],
                    max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
                tokens.append(r.usage.completion_tokens)
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 -- a lost request is a result here
                lost.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": clients * requests, "answered": len(tokens), "lost": len(lost),
            "tokens": sum(tokens), "seconds": round(wall, 3), "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1), "errors": lost[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="run directory (default: the latest finished run under outputs/)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    ns = ap.parse_args()
    from openai import OpenAI

    os.environ.setdefault("LLAMA_LORA_CACHE", str(ROOT / ".cache" / "llama_lora"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"serve_load-{port}.log"  # the server's own log, for a failure
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    proc = start(ns.run, port, ns.max_batch, log)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        model = next(m.id for m in client.models.list().data if m.model_extra.get("kind") != "base")
        load(client, model, 2, 2, 8)  # warm-up
        rows = [load(client, model, int(c), ns.requests, ns.max_tokens) for c in ns.clients.split(",")]
    finally:
        proc.terminate()
        proc.wait(60)
    one = rows[0]["tokens_per_s"]
    print(f"model {model}, {ns.requests} requests per client of {ns.max_tokens} tokens, server --max-batch "
          f"{ns.max_batch}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| clients | requests | lost | tokens/s | vs 1 client | p50 latency | p99 latency |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['lost']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / one:.2f}x | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms |")
    Path(ns.out).write_text(json.dumps({"model": model, "max_tokens": ns.max_tokens, "max_batch": ns.max_batch,
                                        "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    if any(r["lost"] for r in rows):
        raise SystemExit("some requests were lost: " + "; ".join(e for r in rows for e in r["errors"]))


if __name__ == "__main__":
    main()
