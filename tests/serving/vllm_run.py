"""Runs a pqk checkpoint in vLLM and prints what it generated as one line ``PQK_RESULT <json>``. Executed
with the vLLM environment's Python by tests/serving/test_vllm.py (vLLM pins another transformers than the tests):

    python tests/serving/vllm_run.py CKPT --prompts '[[5, 17], [42]]' --max-tokens 64 [--tp 2] [--no-connector]
        [--block-size 32] [--max-batched-tokens 32]

Greedy, float32, prompts as token ids (no tokenizer); per prompt the generated ids, each one's logprob and the
prompt ids vLLM ran (the prefix included). A second line ``PQK_KV_BLOCKS <n> <block size>`` says how many KV cache
blocks vLLM allocated (VLLM_CPU_KVCACHE_SPACE=1: 1 GiB, so their count tells the bytes per token)."""
import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", required=True, help="JSON list of token id lists")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--no-connector", action="store_true", help="serve without the prefix connector")
    ap.add_argument("--dtype", default="float32", help="vLLM's dtype for the float parts")
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's KV cache dtype (fp8: AVX-512 CPUs only)")
    ap.add_argument("--block-size", type=int, default=None, help="tokens per KV cache block (vLLM's default: None)")
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="tokens per step: a longer prompt is prefilled in chunks")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(a.tp)))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    kv = None if a.no_connector else KVTransferConfig(
        kv_connector="PrefixKVConnector", kv_connector_module_path="prefixquant_kernels.serving.vllm_prefix",
        kv_role="kv_both")
    llm = LLM(model=a.checkpoint, skip_tokenizer_init=True, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype,
              max_model_len=256, enforce_eager=True, tensor_parallel_size=a.tp, kv_transfer_config=kv, seed=0,
              block_size=a.block_size, max_num_batched_tokens=a.max_batched_tokens,
              enable_chunked_prefill=a.max_batched_tokens is not None or None)
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(a.prompts)], sp)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"prompt": list(o.prompt_token_ids), "tokens": list(c.token_ids),
                    "logprobs": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]})
    print("PQK_RESULT " + json.dumps(res), flush=True)
    cache = llm.llm_engine.vllm_config.cache_config
    print(f"PQK_KV_BLOCKS {cache.num_gpu_blocks} {cache.block_size}", flush=True)


if __name__ == "__main__":
    main()
