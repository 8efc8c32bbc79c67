"""One vLLM engine that benchmarks/serving.py --engines drives round by round; run with the vLLM environment's Python
(vLLM pins another transformers than the package's environment).

    python benchmarks/serving_engine.py --model DIR [--connector] [--dtype bfloat16] [--max-model-len 200] [--eager]

Builds vLLM's offline engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the one-process executor: nothing
of it runs while the engine waits), warms it up, prints ``READY``; then for each stdin line, a JSON object
``{"prompts": [[token ids], ...], "max_tokens": n}``, generates all prompts at once (greedy, ``ignore_eos``: exactly
n tokens each) and prints ``RESULT {"wall_s": ..., "tokens": ...}``. Those are the only lines on stdout; vLLM's log
goes to stderr. --connector adds the prefix connector a pqk checkpoint needs (what ``prefixquant_kernels serve``
configures); PQK_VLLM_FLOAT_KV=1 in the environment serves a static-KV checkpoint on vLLM's 16-bit cache. The
model runs as vLLM's server runs it by default (its torch.compile mode); --eager: enforce_eager.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--connector", action="store_true", help="the prefix connector (a pqk checkpoint)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--eager", action="store_true", help="vLLM's enforce_eager (no torch.compile)")
    a = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from prefixquant_kernels.serving.server import kv_transfer_config

    kv = KVTransferConfig(**kv_transfer_config()) if a.connector else None
    llm = LLM(model=a.model, skip_tokenizer_init=True, dtype=a.dtype, max_model_len=a.max_model_len,
              enforce_eager=a.eager, kv_transfer_config=kv, seed=0, distributed_executor_backend="uni")

    def generate(prompts: list[list[int]], max_tokens: int) -> dict:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return {"wall_s": time.perf_counter() - t0, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}

    generate([[100 + i for i in range(16)]] * 2, 4)        # warm-up: the first steps build caches and plans
    print("READY", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print("RESULT " + json.dumps(generate(job["prompts"], job["max_tokens"])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
