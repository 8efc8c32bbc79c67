"""The pqk:: custom ops on CUDA tensors: each checks its arguments (ops/checks.py, plus what only the launchers
need), allocates outputs with torch and calls a launcher of libpqk_cuda.so (ops/cuda_library.py). Registered for
the "cuda" dispatch key at the bottom of this module (pure bookkeeping: no GPU needed).

    pqk::quantize_static     pqk_quantize_static        x fp16/bf16/fp32, bits 4 or 8
    pqk::quantize_per_token  pqk_quantize_per_token     x fp16/bf16/fp32, bits 4 or 8
    pqk::int4_matmul         pqk_int4_gemm              W4A4 only: a and w packed uint8
    pqk::quant_linear        static a_scale: pqk_quantize_static + pqk_int4_gemm, or with M <= FUSED_A_MAX_M
                             pqk_quant_gemm_static (one launch: the quantize in the GEMM's A load; see below)
                             per token: pqk_quantize_per_token + pqk_int4_gemm   W4A4 only: w uint8, a_bits 4
    pqk::int4_matmul_requant / pqk::int4_matmul_silu_mul_requant
                             pqk_int4_gemm epilogue 3 / 4 (packed int4 out)     W4A4 only
    pqk::quant_linear_silu_mul_requant
                             pqk_quant_gemm_static epilogue 4 (float x in, packed int4 out: one launch), or
                             above FUSED_A_MAX_M rows pqk_quantize_static + pqk_int4_gemm epilogue 4
    pqk::rmsnorm_quantize    pqk_rmsnorm_quantize       x fp16/bf16/fp32 (weight cast to x.dtype by ops/transform.py)
    pqk::hadamard_transform  pqk_hadamard               x fp16/bf16/fp32, n = m * 2^p (hadamard.hadamard_factor)
    pqk::pack_int4 / unpack_int4, W4A8 / W8A8: no CUDA kernel (ops/backend.py: "auto" runs the reference there,
        "cuda" raises NotImplementedError).

The quantize fused into the GEMM's A load fetches the float A tile one K tile ahead (in registers), where the
packed int4 A of pqk_int4_gemm rides the cp.async pipeline STAGES - 1 tiles ahead: each K tile waits a full global
load. Measured on an H200 (sm_90, CUDA graphs, docs/PERF.md step 21), the fused launch took 3.2-7.3x the time
of quantize + GEMM at M = 1 (26 vs 8 us at N = 1024, 373 vs 51 us at N = 28672) and 2.6-4.0x at M = 64..4096.
So static linears take quantize + GEMM at every M by default: FUSED_A_MAX_M = 0 ($PQK_FUSED_A_MAX_M: the rows up
to which the fused kernel is used). The fused kernel stays built and tested (selftest times both) until its A
operand gets a multi-stage pipeline; sm_80/86/89 were not measured.

The decode GEMV (config GEMV = 3, M <= 4: W streamed with 16-byte loads, int4 x int4 dot products in the integer
ALU, no tensor cores; gemm_math.cuh "decode GEMV") is built, bit-exact in the host harness, and opt-in:
$PQK_DECODE_GEMV_MAX_M = the rows up to which GEMMs and static linears take it (default 0: none) — written after the
H200 measured the tiles at 7-25 % of HBM bandwidth at M = 1, not yet timed on a GPU (selftest times it beside the
tile when a GPU runs it).

Decode GEMMs (M <= 16) whose ceil(N / 32) blocks would not fill the GPU split K (pqk_gemm_split_k decides from the
SM count; a zeroed int32 workspace from torch per call; the exact int32 sums make it bit-identical).

CUDA graphs: every launch goes to ``torch.cuda.current_stream()``, nothing synchronizes or copies host data, and every
buffer (outputs, temporaries, K padding) comes from torch's caching allocator. torch.compile sees each op as one
opaque node traced with its fake (ops/library.py); these functions run only when the compiled graph executes.

K not a multiple of 32 (the tensor-core GEMM consumes K in steps of 32): A and W are PADDED with zero bytes to the next
multiple of 32 (a zero nibble adds 0 to the exact int32 sum, so the result is bit-identical). That costs a copy of A
and W per call; every LLM width is a multiple of 32, so a real model never takes this path. Operands whose address is
not 16-byte aligned (a view at an odd offset) are copied to a fresh, aligned allocation the same way.

Errors: a bad argument raises ValueError/TypeError naming the op and the argument before any launch; a non-zero
launcher status becomes a RuntimeError naming the op, the launcher and pqk_cuda_error_string(status). A launch error
is reported when it is queued (cudaGetLastError); a fault inside a running kernel surfaces, as with every CUDA op,
at the next synchronizing call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hadamard import factor_matrix
from . import checks, cuda_library
from . import library  # noqa: F401  (the pqk:: schemas must exist before kernels are registered for them)

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}   # x_dtype of pqk_cuda.h
GEMM_EPILOGUES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # epilogue codes for a float output
EPI_REQUANT, EPI_SILU_MUL_REQUANT = 3, 4  # pqk_int4_gemm epilogue codes with a packed int4 output
K_STEP = 32          # the GEMM's K granularity (pqk_int4_gemm returns PQK_ERR_K_ALIGN otherwise)
GEMM_ALIGN = 16      # bytes; A and W are read with 16-byte cp.async (PQK_ERR_PTR_ALIGN otherwise)


def _env_rows(name: str, default: int = 0) -> int:
    v = os.environ.get(name, str(default))
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer (rows), got {v!r}") from None


FUSED_A_MAX_M = _env_rows("PQK_FUSED_A_MAX_M")   # static linears with at most this many rows take the fused A-load
#                                                  kernel (0: none; the module doc gives the measurement)
GEMV = 3          # pqk_int4_gemm / pqk_quant_gemm_static config of the decode GEMV (M <= GEMV_ROWS)
GEMV_ROWS = 4
GEMV_MAX_M = min(GEMV_ROWS, _env_rows("PQK_DECODE_GEMV_MAX_M"))   # GEMMs with at most this many rows take it (0: none)


def _launch(op: str, launcher: str, *args) -> None:
    """Calls one launcher; a non-zero status (a negative PqkStatus or a cudaError_t) -> RuntimeError naming the op."""
    lib = cuda_library.require(op)
    st = getattr(lib, launcher)(*args)
    if st != 0:
        raise RuntimeError(f"pqk.{op}: {launcher} failed: {lib.pqk_cuda_error_string(st).decode()} (status {st})")


def _stream(t: torch.Tensor) -> int:
    """The cudaStream_t of torch's current stream on t's device (the capture stream inside torch.cuda.graph)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _on_device(t: torch.Tensor):
    """Makes t's GPU current: torch's cudaSetDevice makes that device's primary context current on this thread, and
    the library's own (static) CUDA runtime launches into the thread's current context."""
    return torch.cuda.device(t.device)


_SMS: dict = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, read once per device (the input of the GEMM's split-K policy and of the
    Triton decode attention's slice length); 1 for other devices (the Triton interpreter on CPU tensors)."""
    if device.type != "cuda":
        return 1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _launch_config(op: str, t: torch.Tensor, m: int, n: int, k: int) -> tuple[int, int, torch.Tensor | None]:
    """(config, split_k, workspace) of an m-row GEMM launch: the decode GEMV up to GEMV_MAX_M rows (no split-K),
    else the library's auto config with its split-K policy (_split_k)."""
    if m <= GEMV_MAX_M:
        return GEMV, 1, None
    return (-1, *_split_k(op, t, m, n, k))


def _split_k(op: str, t: torch.Tensor, m: int, n: int, k: int) -> tuple[int, torch.Tensor | None]:
    """(split_k, zeroed int32 workspace or None) for an auto-config GEMM: the library's policy (pqk_gemm_split_k:
    split K only at M <= 16 when ceil(N / 32) blocks would not fill the GPU); the workspace comes from torch's
    allocator (graph capturable: torch.zeros is a memset on the current stream)."""
    lib = cuda_library.require(op)
    splits = lib.pqk_gemm_split_k(m, n, k, sm_count(t.device))
    if splits <= 1:
        return 1, None
    return splits, torch.zeros(lib.pqk_gemm_split_k_workspace(m, n), dtype=torch.int32, device=t.device)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---- what only the launchers need: W4A4, int32 sizes, K padding, 16-byte alignment --------------------------------

def is_aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0


def contiguous_aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """t as a contiguous tensor whose address is a multiple of `nbytes`: t itself when it already is, else a copy
    (a fresh allocation from torch's allocator is at least 64-byte aligned on CPU, 512 on CUDA)."""
    t = t.contiguous()
    return t if is_aligned(t, nbytes) else t.clone()


def padded_k(k: int) -> int:
    """K rounded up to the GEMM's step of 32."""
    return -(-k // K_STEP) * K_STEP


def pad_packed_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [R, K/2] packed int4 -> [R, padded_k(K)/2] with zero bytes appended (zero nibbles add 0 to every dot
    product, so the GEMM result is unchanged); t itself when K is already a multiple of 32."""
    kp = padded_k(k)
    return t if kp == k else F.pad(t, (0, (kp - k) // 2))


@dataclass(frozen=True)
class GemmArgs:
    m: int
    n: int
    k: int               # the real K (elements)
    k_launch: int        # K passed to the kernel: padded_k(k)
    per_token: bool      # a_scale has one entry per row of A
    epilogue: int        # pqk_int4_gemm epilogue code for out_dtype


def check_gemm(op: str, a, w, a_scale, w_scale, bias, out_dtype) -> GemmArgs:
    """Everything pqk_int4_gemm needs to know, validated: a uint8 [M, K/2], w uint8 [N, K/2] on a's device,
    a_scale float with 1 or M elements, w_scale float [N], bias float [N] or None, out_dtype fp16/bf16/fp32."""
    checks.tensor(a, "a", op, (torch.uint8, torch.int8), dim=2)
    dev = a.device
    checks.tensor(w, "w", op, (torch.uint8, torch.int8), dim=2)
    checks.same_device(op, dev, w=w)
    if a.dtype != torch.uint8 or w.dtype != torch.uint8:
        checks.fail(op, f"the CUDA GEMM is W4A4 only (a and w packed int4, uint8), got a {_dt(a.dtype)} and "
                        f"w {_dt(w.dtype)}; use backend='reference' (backend='auto' does) for int8 operands",
                    NotImplementedError)
    m, n, k = a.shape[0], w.shape[0], 2 * a.shape[1]
    checks.weight_k(w, k, op, 4)
    s = checks.row_scales(a_scale, "a_scale", op, m, dev)
    checks.channel_vector(w_scale, "w_scale", op, n, dev, positive=True)
    if bias is not None:
        checks.channel_vector(bias, "bias", op, n, dev, positive=False)
    checks.out_dtype(out_dtype, op)
    if m and n:
        checks.launch_sizes(op, M=m, N=n, K=padded_k(k))
    return GemmArgs(m, n, k, padded_k(k), m > 1 and s.numel() == m, GEMM_EPILOGUES[out_dtype])


def check_rows(op: str, x, bits: int, bits_name: str = "bits") -> tuple[int, int]:
    """x fp16/bf16/fp32 [..., K] (K even for bits 4), bits 4 or 8 -> (rows, cols) for a row-wise launcher."""
    checks.activation(x, bits, op, bits_name)
    cols = x.shape[-1]
    rows = x.numel() // cols
    if rows:
        checks.launch_sizes(op, rows=rows, cols=cols)
    return rows, cols


def _quantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    shape = [*x.shape[:-1], x.shape[-1] // 2 if bits == 4 else x.shape[-1]]
    return torch.empty(shape, dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    # the launchers read fp32 scales/bias; .to/.contiguous are no-ops (no copy) for the usual fp32 contiguous input
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


# ---- implementations of the pqk:: ops for CUDA tensors ---------------------------------------------------------

def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::quantize_static on CUDA: one launch of pqk_quantize_static (elementwise, no reduction)."""
    return _quantize_static("quantize_static", x, scale, bits)


def quantize_per_token(x: torch.Tensor, bits: int, cpu_isa: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """pqk::quantize_per_token on CUDA: one block per row (max-reduction, then quantize)."""
    return _quantize_per_token("quantize_per_token", x, bits)


def _quantize_static(op: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = check_rows(op, x, bits)
    s = _f32(checks.static_scale(scale, "scale", op, x.device))
    out = _quantized(x, bits)
    if rows:
        x = x.contiguous()
        with _on_device(x):
            _launch(op, "pqk_quantize_static", x.data_ptr(), DTYPE_CODES[x.dtype], out.data_ptr(), s.data_ptr(),
                    bits, rows, cols, _stream(x))
    return out


def _quantize_per_token(op: str, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = check_rows(op, x, bits)
    out = _quantized(x, bits)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows:
        x = x.contiguous()
        with _on_device(x):
            _launch(op, "pqk_quantize_per_token", x.data_ptr(), DTYPE_CODES[x.dtype], out.data_ptr(),
                    scales.data_ptr(), bits, rows, cols, _stream(x))
    return out, scales


def _gemm(op: str, g: GemmArgs, a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, out_dtype: torch.dtype, epilogue: int | None = None,
          out_scale: float = 1.0) -> torch.Tensor:
    """Launches pqk_int4_gemm for checked arguments (g from check_gemm); pads K and realigns as documented above.
    epilogue None: g.epilogue (dequant to out_dtype); EPI_REQUANT / EPI_SILU_MUL_REQUANT: uint8 [M, N/2] / [M, N/4]."""
    cols = g.n if epilogue is None else g.n // (2 if epilogue == EPI_REQUANT else 4)
    out = torch.empty(g.m, cols, dtype=out_dtype if epilogue is None else torch.uint8, device=a.device)
    if g.m == 0 or g.n == 0:
        return out
    a = contiguous_aligned(pad_packed_k(a.contiguous(), g.k), GEMM_ALIGN)
    w = contiguous_aligned(pad_packed_k(w.contiguous(), g.k), GEMM_ALIGN)
    a_s, w_s, b = _f32(a_scale), _f32(w_scale), _f32(bias)
    with _on_device(a):
        config, splits, ws = _launch_config(op, a, g.m, g.n, g.k_launch)
        _launch(op, "pqk_int4_gemm", a.data_ptr(), w.data_ptr(), out.data_ptr(), a_s.data_ptr(), int(g.per_token),
                w_s.data_ptr(), _ptr(b), out_scale, g.m, g.n, g.k_launch,
                g.epilogue if epilogue is None else epilogue, config, splits, _ptr(ws), _stream(a))
    return out


def int4_matmul(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul on CUDA (W4A4): pqk_int4_gemm with the dequant epilogue writing out_dtype directly."""
    op = "int4_matmul"
    g = check_gemm(op, a, w, a_scale, w_scale, bias, out_dtype)
    return _gemm(op, g, a, w, a_scale, w_scale, bias, out_dtype)


def _requant(op: str, epilogue: int, a, w, a_scale, w_scale, bias, out_scale: float) -> torch.Tensor:
    g = check_gemm(op, a, w, a_scale, w_scale, bias, torch.float32)
    checks.requant_n(g.n, 2 if epilogue == EPI_REQUANT else 4, op)
    s_out = checks.out_scale(out_scale, op)
    return _gemm(op, g, a, w, a_scale, w_scale, bias, torch.float32, epilogue, s_out)


def int4_matmul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_scale: float, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul_requant on CUDA: one pqk_int4_gemm launch, epilogue 3 (requant with out_scale)."""
    return _requant("int4_matmul_requant", EPI_REQUANT, a, w, a_scale, w_scale, bias, out_scale)


def int4_matmul_silu_mul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                                 bias: torch.Tensor | None, out_scale: float, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul_silu_mul_requant on CUDA: one launch, epilogue 4 (w rows interleaved gate/up)."""
    return _requant("int4_matmul_silu_mul_requant", EPI_SILU_MUL_REQUANT, a, w, a_scale, w_scale, bias, out_scale)


def _quant_gemm_static(op: str, x: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, epilogue: int, out_scale: float = 1.0,
                       fused: bool | None = None) -> torch.Tensor:
    """The static linear for checked x [M, K] (2-D), w uint8 [N, K/2], a_scale the static 0-dim scale on x's
    device: epilogue = x.dtype's dequant code (out x.dtype [M, N]) or EPI_SILU_MUL_REQUANT (uint8 [M, N/4]).
    fused None: one pqk_quant_gemm_static launch when M <= FUSED_A_MAX_M or M <= GEMV_MAX_M (then the GEMV), else
    pqk_quantize_static + pqk_int4_gemm (the module doc says why); True / False force one (selftest times both).
    Bit-identical either way (the same quantize, the same exact int32 sums, the same epilogue). K not a multiple of
    32: x is padded with zeros (quantized to 0: the sums are unchanged) and w with zero bytes, as in _gemm."""
    m, k, n = x.shape[0], x.shape[1], w.shape[0]
    checks.channel_vector(w_scale, "w_scale", op, n, x.device, positive=True)
    if bias is not None:
        checks.channel_vector(bias, "bias", op, n, x.device, positive=False)
    # (the GEMV's threads each quantize their own A chunk once: no A pipeline to starve, so it takes float A)
    if not ((m <= FUSED_A_MAX_M or m <= GEMV_MAX_M) if fused is None else fused):
        q = _quantize_static(op, x, a_scale, 4)
        dt = x.dtype if epilogue != EPI_SILU_MUL_REQUANT else torch.float32
        g = check_gemm(op, q, w, a_scale, w_scale, bias, dt)
        return _gemm(op, g, q, w, a_scale, w_scale, bias, dt, None if epilogue != EPI_SILU_MUL_REQUANT else epilogue,
                     out_scale)
    silu = epilogue == EPI_SILU_MUL_REQUANT
    out = torch.empty(m, n // 4 if silu else n, dtype=torch.uint8 if silu else x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    kp = padded_k(k)
    checks.launch_sizes(op, M=m, N=n, K=kp)
    x = contiguous_aligned(F.pad(x, (0, kp - k)) if kp != k else x, GEMM_ALIGN)
    w = contiguous_aligned(pad_packed_k(w.contiguous(), k), GEMM_ALIGN)
    s, w_s, b = _f32(a_scale), _f32(w_scale), _f32(bias)
    with _on_device(x):
        config, splits, ws = _launch_config(op, x, m, n, kp)
        _launch(op, "pqk_quant_gemm_static", x.data_ptr(), DTYPE_CODES[x.dtype], s.data_ptr(), w.data_ptr(),
                out.data_ptr(), w_s.data_ptr(), _ptr(b), out_scale, m, n, kp, epilogue, config, splits, _ptr(ws),
                _stream(x))
    return out


def quant_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None, a_bits: int,
                 bias: torch.Tensor | None, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::quant_linear on CUDA (W4A4). Static a_scale: one launch of pqk_quant_gemm_static (x quantized inside the
    GEMM's A load, dequant to x.dtype). None (per token, the baseline): pqk_quantize_per_token, then pqk_int4_gemm."""
    op = "quant_linear"
    rows, cols = check_rows(op, x, a_bits, "a_bits")
    checks.tensor(w, "w", op, (torch.uint8, torch.int8), dim=2)
    checks.same_device(op, x.device, w=w)
    if a_bits != 4 or w.dtype != torch.uint8:
        checks.fail(op, f"the CUDA kernels are W4A4 only (w packed uint8, a_bits 4), got w {_dt(w.dtype)} and "
                        f"a_bits {a_bits}; use backend='reference' (backend='auto' does)", NotImplementedError)
    if x.dim() != 2:
        checks.fail(op, f"x must be 2-D [M, K] (the public op flattens), got shape {tuple(x.shape)}")
    checks.weight_k(w, cols, op, a_bits)
    if a_scale is not None:
        s = checks.static_scale(a_scale, "a_scale", op, x.device)
        return _quant_gemm_static(op, x, w, s, w_scale, bias, GEMM_EPILOGUES[x.dtype])
    q, s = _quantize_per_token(op, x, 4)      # s: fp32 [M], one scale per row
    g = check_gemm(op, q, w, s, w_scale, bias, x.dtype)
    return _gemm(op, g, q, w, s, w_scale, bias, x.dtype)


def quant_linear_silu_mul_requant(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                                  bias: torch.Tensor | None, out_scale: float, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::quant_linear_silu_mul_requant on CUDA: one pqk_quant_gemm_static launch, epilogue 4 (w rows interleaved
    gate/up, x quantized in the A load with the static a_scale)."""
    op = "quant_linear_silu_mul_requant"
    check_rows(op, x, 4)
    if x.dim() != 2:
        checks.fail(op, f"x must be 2-D [M, K] (the public op flattens), got shape {tuple(x.shape)}")
    checks.tensor(w, "w", op, (torch.uint8,), dim=2)
    checks.same_device(op, x.device, w=w)
    checks.weight_k(w, x.shape[1], op, 4)
    checks.requant_n(w.shape[0], 4, op)
    s = checks.static_scale(a_scale, "a_scale", op, x.device)
    return _quant_gemm_static(op, x, w, s, w_scale, bias, EPI_SILU_MUL_REQUANT, checks.out_scale(out_scale, op))


# ---- rmsnorm_quantize, hadamard_transform: also callable directly on CUDA tensors ----------------------------------

def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int = 4, eps: float = 1e-6,
                     return_normed: bool = False):
    """Fused RMSNorm + static quantize (pqk_rmsnorm_quantize): y = x / sqrt(mean(x^2) + eps) * weight in fp32,
    q = quantize(y, scale). x fp16/bf16 [..., K] (fp32 too), weight x.dtype [K], scale a 1-element CUDA tensor.
    Returns q (uint8 [..., K/2] for bits 4, int8 [..., K] for bits 8), and y in x.dtype if return_normed."""
    op = "rmsnorm_quantize"
    rows, cols = check_rows(op, x, bits)
    checks.norm_weight(weight, op, cols, x.device, (x.dtype,))
    s = _f32(checks.static_scale(scale, "scale", op, x.device))
    eps = checks.eps(eps, op)
    q = _quantized(x, bits)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if return_normed else None
    if rows:
        x, wt = x.contiguous(), weight.contiguous()
        with _on_device(x):
            _launch(op, "pqk_rmsnorm_quantize", x.data_ptr(), DTYPE_CODES[x.dtype], wt.data_ptr(), eps,
                    s.data_ptr(), bits, q.data_ptr(), _ptr(y), rows, cols, _stream(x))
    return (q, y) if return_normed else q


def hadamard_transform(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """The online Walsh-Hadamard rotation (pqk_hadamard): same result definition as
    prefixquant_kernels.hadamard.hadamard_transform(x, inverse=inverse) with the default 1/sqrt(n) scale.
    x fp16/bf16/fp32 [..., n], n = m * 2^p (hadamard.hadamard_factor; other n raise ValueError). Returns x's shape and
    dtype. n too large for the GPU's shared memory -> RuntimeError from the launcher (PQK_ERR_HADAMARD_SIZE)."""
    op = "hadamard_transform"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    m = checks.hadamard_size(x, op)
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows:
        checks.launch_sizes(op, rows=rows, n=n)
        x = x.contiguous()
        with _on_device(x):
            h = None if m == 1 else factor_matrix(m, inverse, x.device)     # m = 1: butterflies only
            _launch(op, "pqk_hadamard", x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype], _ptr(h), m, rows, n,
                    _stream(x))
    return y


# ---- registration for the "cuda" dispatch key (needs no GPU: registering is pure Python bookkeeping) -------------

def _rmsnorm_quantize_op(x, weight, scale, bits, eps, return_normed):
    """pqk::rmsnorm_quantize's schema: always (q, normed), normed empty [0] when not requested."""
    out = rmsnorm_quantize(x, weight, scale, bits, eps, return_normed)
    return out if return_normed else (out, x.new_empty([0]))


def _hadamard_transform_op(x, inverse):
    return hadamard_transform(x, inverse=inverse)


REGISTERED = {
    "pqk::quantize_static": quantize_static,
    "pqk::quantize_per_token": quantize_per_token,
    "pqk::int4_matmul": int4_matmul,
    "pqk::quant_linear": quant_linear,
    "pqk::int4_matmul_requant": int4_matmul_requant,
    "pqk::int4_matmul_silu_mul_requant": int4_matmul_silu_mul_requant,
    "pqk::quant_linear_silu_mul_requant": quant_linear_silu_mul_requant,
    "pqk::rmsnorm_quantize": _rmsnorm_quantize_op,
    "pqk::hadamard_transform": _hadamard_transform_op,
}
for _name, _fn in REGISTERED.items():
    torch.library.register_kernel(_name, "cuda", _fn)
