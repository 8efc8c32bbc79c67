"""Runs pqk checkpoints in vLLM for tests/serving/test_vllm.py, executed with the vLLM environment's Python (vLLM pins
another transformers than the tests). Two ways:

    python tests/serving/vllm_run.py CKPT --prompts '[[5, 17], [42]]' --max-tokens 64 [--tp 2] [--no-connector]
        [--block-size 32] [--max-batched-tokens 32] [--dtype bfloat16] [--kv-cache-dtype fp8]
    python tests/serving/vllm_run.py --serve

The first runs one engine as a user's process would (the engine core and the workers in processes of their own) and
prints ``PQK_RESULT <json>``: greedy, prompts as token ids (no tokenizer); per prompt the generated ids, each one's
logprob and the prompt ids vLLM ran (the prefix included); then ``PQK_KV_BLOCKS <n> <block size>``: how many KV
cache blocks vLLM allocated (VLLM_CPU_KVCACHE_SPACE=1: 1 GiB, so their count tells the bytes per token).

``--serve`` imports vLLM once and runs jobs read from stdin, one JSON object per line, one after another in this
process (vLLM's in-process engine, VLLM_ENABLE_V1_MULTIPROCESSING=0, and its one-process executor): a ~12 s import
and two engine-process starts saved per run, and engines of different checkpoints built one after another in one
process, which the plugin must keep apart. A job ``{"id": ID, "argv": [CKPT, "--prompts", ...]}`` (the first way's
arguments, --tp 1 only) answers ``PQK_RESULT ID <json>`` and ``PQK_KV_BLOCKS ID <n> <size>``, or ``PQK_FAILED ID
<json message>``; a job ``{"id": ID, "config": {...}}`` builds the plugin's config from that quantization_config and
answers ``PQK_CONFIG ID <json: the ValueError's text, or null>``. Every job ends with ``PQK_DONE ID``. The answers
are the only lines on stdout; vLLM's log goes to stderr."""
import argparse
import gc
import json
import os
import sys
import traceback


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--serve", action="store_true", help="run the jobs read from stdin in this process")
    ap.add_argument("--prompts", help="JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--no-connector", action="store_true", help="serve without the prefix connector")
    ap.add_argument("--dtype", default="float32", help="vLLM's dtype for the float parts")
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's KV cache dtype (fp8: AVX-512 CPUs only)")
    ap.add_argument("--block-size", type=int, default=None, help="tokens per KV cache block (vLLM's default: None)")
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="tokens per step: a longer prompt is prefilled in chunks")
    return ap


def generate(a, in_process: bool) -> tuple[list, int, int]:
    """One engine for the arguments ``a`` -> (per prompt results, KV blocks, block size). in_process: the engine
    core and its one worker in this process."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    kv = None if a.no_connector else KVTransferConfig(
        kv_connector="PrefixKVConnector", kv_connector_module_path="prefixquant_kernels.serving.vllm_prefix",
        kv_role="kv_both")
    llm = LLM(model=a.checkpoint, skip_tokenizer_init=True, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype,
              max_model_len=256, enforce_eager=True, tensor_parallel_size=a.tp, kv_transfer_config=kv, seed=0,
              block_size=a.block_size, max_num_batched_tokens=a.max_batched_tokens,
              enable_chunked_prefill=a.max_batched_tokens is not None or None,
              distributed_executor_backend="uni" if in_process else None)
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(a.prompts)], sp)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"prompt": list(o.prompt_token_ids), "tokens": list(c.token_ids),
                    "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    cache = llm.llm_engine.vllm_config.cache_config
    return res, cache.num_gpu_blocks, cache.block_size


def release() -> None:
    """What an in-process engine leaves behind once it is dropped: its distributed groups (the next engine's
    init would find them), its tensors."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


def config_error(quantization_config: dict):
    """The plugin's config from ``quantization_config``: its ValueError's text, or None when it builds."""
    from prefixquant_kernels.serving.vllm_linear import PrefixQuantVllmConfig
    try:
        PrefixQuantVllmConfig.from_config(quantization_config)
    except ValueError as e:
        return str(e)
    return None


def serve() -> None:
    # The answers go out on a private copy of stdout; fd 1 itself then points at stderr, so vLLM's log (a handler
    # on sys.stdout) and anything a library prints land there and never inside an answer line.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def answer(line: str) -> None:
        answers.write(line + "\n")
        answers.flush()
    ap = parser()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        jid = job["id"]
        try:
            if "config" in job:
                answer(f"PQK_CONFIG {jid} " + json.dumps(config_error(job["config"])))
                continue
            a = ap.parse_args(job["argv"])
            if a.tp != 1:
                raise ValueError("--serve runs --tp 1 only (tensor parallel needs its worker processes)")
            res, blocks, size = generate(a, in_process=True)
            answer(f"PQK_RESULT {jid} " + json.dumps(res))
            answer(f"PQK_KV_BLOCKS {jid} {blocks} {size}")
        except Exception as e:      # a checkpoint that fails at load: its message goes back, the server goes on
            answer(f"PQK_FAILED {jid} " + json.dumps(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            if "argv" in job:
                release()
            answer(f"PQK_DONE {jid}")


def main():
    a = parser().parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.serve:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return serve()
    if a.checkpoint is None or a.prompts is None:
        raise SystemExit("vllm_run.py: CKPT and --prompts are required (or --serve)")
    if a.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(a.tp)))
    res, blocks, size = generate(a, in_process=False)
    print("PQK_RESULT " + json.dumps(res), flush=True)
    print(f"PQK_KV_BLOCKS {blocks} {size}", flush=True)


if __name__ == "__main__":
    main()
