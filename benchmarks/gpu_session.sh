#!/usr/bin/env bash
# One prepared GPU session (a lent machine with its own python3/torch/nvcc, nothing to download): what
# `python -m prefixquant_kernels selftest --bench` does, split into stages with their own time limits so that a
# stage that hangs or fails leaves the others' results. Run from the repository root:
#
#   OUT=gpu_out bash benchmarks/gpu_session.sh [stages]   # stages: env,selftest,pytest,layer,model,layer_gemv
#                                                           (default: all; layer_gemv = the layer with the opt-in
#                                                           decode GEMV, PQK_DECODE_GEMV_MAX_M=4)
#
# Optional, carried next to the tree: .whl/*.whl (installed into /tmp/site first: transformers 5.23, which the
# KV cache's Cache API needs, where the machine has another) and .gpu/libpqk_cuda.so (the library built on the CPU
# machine with the same nvcc; used when it loads here, else this tree is built here with nvcc).
# Writes $OUT/log.txt (everything, with the seconds each stage took) and $OUT/gpu.tgz (every JSON / Markdown / PNG).
set -u
OUT=${OUT:-gpu_out}
STAGES=${1:-env,selftest,pytest,layer,model,layer_gemv}
W=/tmp/pqk_gpu
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$W/log.txt"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }
finish() { cp "$W/log.txt" "$OUT/log.txt"; tar czf "$OUT/gpu.tgz" -C "$W" . 2>/dev/null; }
trap finish EXIT
# stage NAME SECONDS CMD...: runs CMD with a time limit, its output to $W/NAME.txt and the log's tail
stage() {
    local name=$1 secs=$2; shift 2
    log "stage $name (limit $secs s): $*"
    timeout -k 5 "$secs" "$@" > "$W/$name.txt" 2>&1
    local rc=$?
    tail -n 60 "$W/$name.txt" >> "$W/log.txt"
    log "stage $name rc=$rc"
    return $rc
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f .gpu/libpqk_cuda.so ] && python3 -c "import ctypes; ctypes.CDLL('.gpu/libpqk_cuda.so')" 2>> "$W/log.txt"; then
    export PQK_CUDA_LIB=$PWD/.gpu/libpqk_cuda.so
    log "library: carried .gpu/libpqk_cuda.so"
else
    log "library: built here (the carried one is absent or does not load)"
fi

if has env; then
    { date -u; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv; nproc; python3 -c "import sys, torch, triton, transformers; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', \
transformers.__version__); p = torch.cuda.get_device_properties(0); print(p)"; nvcc --version | tail -2; } \
        > "$W/env.txt" 2>&1
    cat "$W/env.txt" >> "$W/log.txt"
fi
# kernels vs the reference (CUDA and Triton), GEMM TOPS vs cuBLAS fp16 and _int_mm, decode GEMM bandwidth
has selftest && stage selftest 100 python3 -m prefixquant_kernels selftest $( [ -z "${PQK_CUDA_LIB:-}" ] && echo --build )
# the GPU tests (kernels bit-exact, graph capture, torch.compile fullgraph, fused MLP)
# (not the ptxas/SASS test: it rebuilds the tree for its log, which CI checks anyway)
has pytest && stage pytest 90 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/cuda/test_gpu.py \
    tests/cuda/test_hadamard.py -k "not built_for_every_arch"
# one Llama-3-8B layer, then the whole model: fp16 vs dynamic W4A4 vs static W4A4KV4 (selftest.E2E_GPU's arguments)
for name in layer model; do
    if has $name; then
        args=$(python3 -c "from prefixquant_kernels import selftest; print(' '.join(selftest.E2E_GPU['$name']))")
        # a compiled step that fails to build (the first H200 run's failures were all there) loses every number of
        # the run: then the same benchmark once more with eager decode, so prefill and an eager decode still land
        stage "e2e_$name" $([ $name = layer ] && echo 125 || echo 140) python3 benchmarks/e2e.py $args \
            --json "$W/$name.json" \
            || stage "e2e_${name}_eager" 100 python3 benchmarks/e2e.py $args --compile off --json "$W/${name}_eager.json"
    fi
done
if has layer_gemv; then
    args=$(python3 -c "from prefixquant_kernels import selftest; print(' '.join(selftest.E2E_GPU['layer']))" \
        | sed 's/fp,dynamic,static/fp,static/')
    PQK_DECODE_GEMV_MAX_M=4 stage e2e_layer_gemv 125 python3 benchmarks/e2e.py $args --json "$W/layer_gemv.json"
fi
log "done"
