"""Walsh-Hadamard rotations of size n = m * 2^p (format level: torch only, no kernels).

The online rotation of QuaRot/PrefixQuant multiplies activations (the down_proj input, Q/K) by an orthogonal
Hadamard matrix before quantization, spreading outliers across channels. For n a power of two that is the fast
Walsh-Hadamard transform; LLM widths are often not (11008 = 172 * 64, 13824 = 108 * 128, 14336 = 28 * 512,
1536 = 12 * 128, 576 = 36 * 16), so the rotation is H_m (x) H_{2^p} with a small constructed Hadamard matrix H_m.

Index convention (the CUDA kernel csrc/cuda/hadamard.cu uses the same): a row of length n = m * 2^p is read as a
[m, 2^p] matrix in row-major order, element i = a * 2^p + b, so the 2^p ("b") factor is the fast-varying one and

    hadamard_transform(x)[..., a * P + b] = sum_{a', b'} H_m[a, a'] * H_P[b, b'] * x[..., a' * P + b'] / sqrt(n)

with P = 2^p and H_P the Sylvester matrix in natural order, H_P[b, b'] = (-1)^popcount(b & b'). As a matrix:
``hadamard_transform(x) == x @ hadamard_rotation(n).T``.

    m, p = hadamard_factor(11008)              # (172, 6)
    y = hadamard_transform(x)                  # x [..., 11008] -> y, same shape and dtype, fp32 inside
    x2 = hadamard_transform(y, inverse=True)   # == x up to rounding (H_m is not symmetric for every m)

Supported m: 1 (pure powers of two) and 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172 (SUPPORTED_M). Every other n
(e.g. Qwen2-0.5B's 4864 = 19 * 256) raises a ValueError from hadamard_factor that points to the fallback, a dense
random orthogonal rotation (calibration/rotation.py ``random_orthogonal``), which costs an n x n matmul per token.
"""
from __future__ import annotations

import functools
import math

import torch

SUPPORTED_M = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

# Williamson matrices: first rows of four symmetric circulant +-1 matrices A, B, C, D of order w with
# AA^T + BB^T + CC^T + DD^T = 4w I ('+' = 1, '-' = -1); the Williamson array below makes a Hadamard matrix of order 4w.
# Mathematical data, transcribed from the table of SageMath's sage/combinat/matrices/hadamard_matrix.py
# (williamson_type_quadruples_smallcases), which cites the original sources:
#   w = 43 (order 172): L. D. Baumert and M. Hall Jr., "Hadamard matrices of the Williamson type", Math. Comp. 19
#           (1965) 442-447; also in M. Hall Jr., "Combinatorial Theory", 2nd ed., Wiley.
#   w = 39 (order 156): S. London, "Constructing New Turyn Type Sequences, T-Sequences and Hadamard Matrices",
#           PhD thesis, University of Illinois at Chicago, 2013.
# The construction asserts H H^T = 4w I, and tests/test_hadamard.py checks it again, so a transcription error fails.
_WILLIAMSON = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}

# How each m is built: ("paley1", q) order q + 1 for a prime q = 3 mod 4; ("paley2", q) order 2(q + 1) for a prime
# power q = 1 mod 4; ("double", m/2) the Sylvester doubling [[H, H], [H, -H]]; ("williamson", w) order 4w.
_CONSTRUCTION = {
    12: ("paley1", 11), 20: ("paley1", 19), 60: ("paley1", 59), 108: ("paley1", 107), 140: ("paley1", 139),
    28: ("paley2", 13), 36: ("paley2", 17), 52: ("paley2", 25),
    40: ("double", 20),
    156: ("williamson", 39), 172: ("williamson", 43),
}


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _sylvester(n: int) -> torch.Tensor:
    """int64 [n, n], n a power of two: H[b, b'] = (-1)^popcount(b & b') (natural order)."""
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _quadratic_character(q: int) -> list[list[int]]:
    """chi(e_j - e_i) for the elements of GF(q), q = p or p^2 (p an odd prime): the Jacobsthal matrix Q [q, q].

    GF(p^2) = GF(p)[t] / (t^2 - r) with r the smallest quadratic non-residue mod p; element c0 + c1 t has index
    c0 + p * c1. chi(0) = 0, chi(x) = 1 for a nonzero square, -1 otherwise."""
    p = next(pp for pp in range(3, q + 1, 2) if q % pp == 0)
    k = round(math.log(q, p))
    if p ** k != q or k > 2:
        raise NotImplementedError(f"GF({q}): only primes and squares of primes are implemented")
    if k == 1:
        elems = [(c, 0) for c in range(p)]
        squares = {(c * c % p, 0) for c in range(1, p)}
    else:
        r = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1)
        elems = [(c0, c1) for c1 in range(p) for c0 in range(p)]
        squares = {((c0 * c0 + r * c1 * c1) % p, (2 * c0 * c1) % p) for c0, c1 in elems if (c0, c1) != (0, 0)}

    def chi(e):
        return 0 if e == (0, 0) else (1 if e in squares else -1)

    return [[chi(((ej[0] - ei[0]) % p, (ej[1] - ei[1]) % p)) for ej in elems] for ei in elems]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] (S is skew because chi(-1) = -1)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = torch.tensor(_quadratic_character(q))
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q = 1 mod 4: C = [[0, 1^T], [1, Q]] (symmetric conference matrix),
    H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] (symmetric)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = torch.tensor(_quadratic_character(q))
    return (torch.kron(c, torch.tensor([[1, 1], [1, -1]]))
            + torch.kron(torch.eye(q + 1, dtype=torch.int64), torch.tensor([[1, -1], [-1, -1]])))


def _williamson(w: int) -> torch.Tensor:
    """Order 4w from symmetric circulants: [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]."""
    idx = (torch.arange(w)[None, :] - torch.arange(w)[:, None]) % w     # circulant: M[i, j] = row[(j - i) mod w]
    a, b, c, d = (torch.tensor([1 if ch == "+" else -1 for ch in row])[idx] for row in _WILLIAMSON[w])
    return torch.cat([torch.cat(blk, 1) for blk in ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])], 0)


# A compiled graph takes the matrix as a constant, built once here: dynamo in torch 2.11 traces through lru_cache
# (and then through the orthogonality check's data-dependent torch.equal, which fullgraph refuses); 2.13 did not.
@torch.compiler.assume_constant_result
def _hadamard_int(m: int) -> torch.Tensor:
    return _hadamard_int_built(m)


@functools.lru_cache(maxsize=None)
def _hadamard_int_built(m: int) -> torch.Tensor:
    if _is_pow2(m):
        h = _sylvester(m)
    elif m in _CONSTRUCTION:
        kind, q = _CONSTRUCTION[m]
        if kind == "paley1":
            h = _paley1(q)
        elif kind == "paley2":
            h = _paley2(q)
        elif kind == "double":
            h = _hadamard_int(q)
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        else:
            h = _williamson(q)
    else:
        raise ValueError(f"hadamard_matrix: no construction for m={m}; supported: 1, powers of two and "
                         f"{', '.join(map(str, SUPPORTED_M))}")
    # a construction (or transcription) error must never produce a non-orthogonal "rotation"
    assert h.shape == (m, m) and torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)), m
    return h


def hadamard_matrix(m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A +-1 Hadamard matrix [m, m] (H H^T = m I), unnormalized, for m = 1, 2^k or m in SUPPORTED_M.

    Powers of two: Sylvester (natural order). Others: Paley I (12, 20, 60, 108, 140), Paley II (28, 36, 52 over
    GF(25)), Sylvester-doubled 20 (40), Williamson (156, 172). This is the ``had_m`` the CUDA kernel takes."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"hadamard_matrix: m must be a positive int, got {m!r}")
    return _hadamard_int(m).to(dtype)


_FACTOR_CACHE: dict = {}


def factor_matrix(m: int, inverse: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """H_m (H_m^T for the inverse transform) as the C++ and CUDA kernels read it: float32 [m, m], contiguous, on
    ``device``, built once per (m, inverse, device): a kernel call copies nothing to the device, so a CUDA graph
    can capture hadamard_transform after one eager call."""
    key = (m, inverse, torch.device(device))
    if key not in _FACTOR_CACHE:
        h = hadamard_matrix(m, torch.float32)
        _FACTOR_CACHE[key] = (h.T if inverse else h).contiguous().to(key[2])
    return _FACTOR_CACHE[key]


def _factor2(n: int) -> tuple[int, int]:
    """n = odd * 2^e."""
    e = (n & -n).bit_length() - 1
    return n >> e, e


def hadamard_factor(n: int) -> tuple[int, int]:
    """(m, p) with n = m * 2^p, m = 1 or in SUPPORTED_M, choosing the largest 2^p (so the cheap butterfly part is as
    large as possible and the O(m) part as small as possible). Raises ValueError for every other n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"hadamard_factor: n must be a positive int, got {n!r}")
    odd, e = _factor2(n)
    for p in range(e, -1, -1):
        m = n >> p
        if m == 1 or m in SUPPORTED_M:
            return m, p
    raise ValueError(
        f"hadamard_factor: no Hadamard transform for n={n} = {odd} * 2^{e}: n must be m * 2^p with m = 1 or m in "
        f"{{{', '.join(map(str, SUPPORTED_M))}}}. Use a dense random orthogonal rotation instead "
        f"(prefixquant_kernels.calibration.rotation.random_orthogonal(n, seed), folded into the weights; online it "
        f"costs an n x n matmul per token), or pad the dimension to a supported size.")


def hadamard_rotation(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal [n, n] matrix R = (H_m (x) H_{2^p}) / sqrt(n) of hadamard_transform: transform(x) = x @ R.T.

    For folding into weights (W -> W R^T on the reader side); dense, so only for moderate n."""
    m, p = hadamard_factor(n)
    return torch.kron(hadamard_matrix(m, torch.float64), _sylvester(1 << p).double()).to(dtype) / math.sqrt(n)


def _butterflies(v: torch.Tensor, p: int) -> torch.Tensor:
    """Sylvester WHT (unnormalized) over the last dim of length 2^p, radix-2 stages on bit 0, 1, ..., p - 1;
    stage j maps the pair (u = element with bit j clear, w = element with bit j set) to (u + w, u - w). The CUDA
    kernel applies the same stages in the same order, so this part is bit-identical in fp32."""
    lead = v.shape[:-1]
    for j in range(p):
        h = 1 << j
        v = v.reshape(*lead, (1 << p) >> (j + 1), 2, h)      # explicit sizes: lead may hold a 0 (M = 0)
        u, w = v[..., 0, :], v[..., 1, :]
        v = torch.stack([u + w, u - w], dim=-2)
    return v.reshape(*lead, 1 << p)


def _transform(x: torch.Tensor, scale: float | None, inverse: bool, sequential: bool) -> torch.Tensor:
    op = "hadamard_transform"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pqk.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"pqk.{op}: x must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"pqk.{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    try:
        m, p = hadamard_factor(n)
    except ValueError as e:
        raise ValueError(f"pqk.{op}: x.shape[-1]: {e}") from None
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"pqk.{op}: scale must be a finite float or None, got {scale!r}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32   # fp32 inside for 16-bit inputs
    h = hadamard_matrix(m, cdt)
    h = h.T if inverse else h                                            # H_P is symmetric; H_m need not be
    return _apply(x.to(cdt), m, p, h, scale, sequential).to(x.dtype)


def _apply(x: torch.Tensor, m: int, p: int, h: torch.Tensor, scale: float, sequential: bool) -> torch.Tensor:
    """(h (x) H_{2^p}) x * scale along the last dim (length m * 2^p) in x's dtype; no checks. sequential=True sums
    the m-point stage in the CUDA kernel's order, acc[a] = ((0 + h[a,0] z[0]) + h[a,1] z[1]) + ... (h = +-1: exact
    products), which makes the fp32 result bit-identical to the kernel's; False uses a matmul (faster on CPU)."""
    v = _butterflies(x.reshape(*x.shape[:-1], m, 1 << p), p)             # [..., m, P]: H_P along b
    if m > 1:
        if sequential:
            acc = torch.zeros_like(v)
            for k in range(m):
                acc = acc + h[:, k, None] * v[..., k, None, :]
            v = acc
        else:
            v = torch.matmul(h, v)                                       # [m, m] @ [..., m, P]
    return v.reshape(x.shape) * scale


def hadamard_transform(x: torch.Tensor, scale: float | None = None, *, inverse: bool = False) -> torch.Tensor:
    """y = (H_m (x) H_{2^p}) x * scale along the last dim (scale defaults to 1/sqrt(n): an orthogonal rotation).

    x: float16/bfloat16/float32/float64 [..., n], n = m * 2^p (hadamard_factor). Computed in fp32 (fp64 for fp64
    input) in O(n log n + n m): radix-2 butterflies on the 2^p part, an [m, m] matmul on the m part; returned in
    x's dtype. inverse=True applies the transpose ((H_m^T (x) H_P) x * scale), so with the default scale
    ``hadamard_transform(hadamard_transform(x), inverse=True) == x`` up to rounding. Index convention: module doc.
    Raises TypeError/ValueError naming ``x``/``scale`` for bad input, ValueError for an unsupported n."""
    return _transform(x, scale, inverse, sequential=False)
