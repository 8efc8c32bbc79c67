"""QuantConfig: what quantize_model does to a model (bits, static or dynamic activations, prefix, KV mode).

    cfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, act_quant="static", prefix=True)

Validated when built (``ValueError`` naming the field); ``to_dict`` / ``from_dict`` round-trip through the
checkpoint's JSON. Below both models/ (the state a quantized model carries) and calibration/ (which re-exports it
as calibration.config): it imports neither. The KV modes and the bit widths each supports come from the KV cache's
registry (prefixquant_kernels/cache/registry.py), read when a config is validated; ``KV_MODES`` and ``KV_BITS``
are computed from it when first read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACT_QUANT = ("static", "dynamic")
WEIGHT_METHODS = ("auto", "rtn", "gptq")
LINEAR_BITS = (4, 8)
CONFIG_VERSION = 1
AUTO_KV_MODE = "auto"   # resolved_kv_mode: "static" for static activations, "dynamic" otherwise


def kv_modes() -> tuple[str, ...]:
    """kv_mode's values: "auto" and every registered KV mode (canonical names; aliases are the cache's)."""
    from .cache.registry import kv_modes as registered
    return (AUTO_KV_MODE, *registered())


def kv_bits_choices() -> tuple[int, ...]:
    """kv_bits's values: every width some registered mode supports (16: KV not quantized, the "fp16" mode)."""
    from .cache.registry import kv_mode, kv_modes as registered
    return tuple(sorted({b for m in registered() for b in kv_mode(m).bits}))


def __getattr__(name):   # KV_MODES / KV_BITS: read from the registry when first asked (it may import transformers)
    if name == "KV_MODES":
        return kv_modes()
    if name == "KV_BITS":
        return kv_bits_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.QuantConfig: {msg}")


@dataclass
class QuantConfig:
    """Quantization recipe.

    w_bits, a_bits: 4 or 8 (weights per output channel; activations per tensor (static) or per token (dynamic)).
    kv_bits: 4 or 8 for kv_mode "static" / "dynamic"; 2 or 4 for "kivi" / "logquant"; 16 = KV not quantized
             (each mode declares its widths: pqk.cache.kv_mode(name).bits).
    act_quant: "static" (one calibrated scale per linear input) or "dynamic" (per token at run time, QuaRot-style).
    prefix: put PrefixQuant's outlier tokens first, as a 16-bit KV prefix (excluded from every calibration).
    prefix_tokens: token ids to use as the prefix (skips discovery); None = find them (``eta``).
    rotate: fold a Hadamard rotation into the weights (QuaRot-style) + online Hadamard on the down_proj input.
    kv_rotate: rotate the KV cache's space per head (PrefixQuant / QuaRot): an online Hadamard ``H [D, D]`` on Q and
             K after RoPE (``(q H)(k H)^T = q k^T``; K is rotated as it enters the cache, which therefore quantizes
             ``K H``; the 16-bit prefix keys are stored rotated too) and a Hadamard folded offline into v_proj's output
             / o_proj's input, per head. It spreads K's channel outliers before the per-head quantizer.
             None (default) = on when ``rotate`` is on, ``kv_bits <= 4`` and the KV mode is "static" or "dynamic"
             (KIVI / LogQuant quantize keys per channel, which a rotation would mix); True / False force it.
    k_center: subtract a static per-head key offset ``mu [H_kv, D]`` (the mean of the calibration keys after RoPE
             and the Q/K rotation) from every key before the static KV cache quantizes it, the 16-bit prefix keys
             included: ``q (k - mu)^T = q k^T - q mu^T`` shifts every score of a query by the same constant, which
             softmax removes, so the attention is unchanged while the per-head scale no longer spends range on the
             keys' mean (the slowly rotating RoPE channels). None (default) = on for the "static" KV mode at
             kv_bits <= 4 (docs/ACCURACY.md: W4A8KV4 18.72 -> 17.92; at KV8 it changes nothing measurable);
             True / False force it (True: kv_mode "static" only).
    weight_method: "rtn" (per-channel RTN with a clip search), "gptq", or "auto" (GPTQ for 4-bit weights).
    kv_mode: "auto" (static per-head for static activations, dynamic per-token otherwise), or a registered KV
             mode: "static", "dynamic", "kivi", "logquant", "fp16" (docs/KV_CACHE.md).
    kv_window: LogQuant's window W (16-bit tokens: a recent list of <= 2W and a sparse list of <= W).
    calib_samples x calib_seq_len: calibration tokens; max_calib_rows: rows kept per quantizer for the searches.
    finetune: after the training-free calibration, PrefixQuant's block-wise fine-tuning (calibration/finetune.py) on
             the calibration samples: per block, the static activation scales and weight scales (learning rate
             ``finetune_lr``, in log space) and, with ``finetune_weights``, the weights (``finetune_weight_lr``),
             ``finetune_epochs`` passes over the samples; static activations only.
    finetune_weight_lr: Adam's learning rate for the weights. None (default) = 5e-4 for 4-bit weights, 5e-5 for
             8-bit: a step moves a weight by about the learning rate, which must be a fair part of the quantization
             step for the rounding to change (docs/ACCURACY.md "The weights' learning rate": W4A4KV4 on SmolLM2
             27.72 at 5e-5, 24.42 at 2e-4, 23.16 at 5e-4, 24.58 at 1e-3).
    """

    w_bits: int = 4
    a_bits: int = 8
    kv_bits: int = 4
    act_quant: str = "static"
    prefix: bool = True
    prefix_tokens: list[int] | None = None
    rotate: bool = True
    kv_rotate: bool | None = None
    k_center: bool | None = None
    weight_method: str = "auto"
    kv_mode: str = "auto"
    kv_window: int = 32
    eta: float = 64.0
    max_prefix_len: int = 8
    calib_samples: int = 16
    calib_seq_len: int = 256
    max_calib_rows: int = 512
    act_clip_search: bool = True
    gptq_damp: float = 0.01
    gptq_block: int = 128
    seed: int = 0
    finetune: bool = False
    finetune_epochs: int = 10
    finetune_lr: float = 5e-3
    finetune_weights: bool = True
    finetune_weight_lr: float | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):   # ints: 4.0 == 4 would pass the choice checks below
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                _fail(f"{name} must be an int, got {v!r}", TypeError)
        for name in ("prefix", "rotate", "act_clip_search"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{name} must be True or False, got {getattr(self, name)!r}", TypeError)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            _fail(f"seed must be an int in [0, 2^63), got {self.seed!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            _fail(f"version must be an int, got {self.version!r}", TypeError)
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v not in LINEAR_BITS:
                _fail(f"{name} must be one of {LINEAR_BITS} (the kernels run int4 and int8), got {v!r}")
        if self.act_quant not in ACT_QUANT:
            _fail(f"act_quant must be one of {ACT_QUANT}, got {self.act_quant!r}")
        if self.weight_method not in WEIGHT_METHODS:
            _fail(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        from .cache.registry import kv_mode
        modes = kv_modes()
        if self.kv_mode not in modes:
            _fail(f"kv_mode must be one of {modes}, got {self.kv_mode!r}")
        bits = kv_bits_choices()
        if isinstance(self.kv_bits, bool) or self.kv_bits not in bits:
            _fail(f"kv_bits must be one of {bits} (16: KV not quantized), got {self.kv_bits!r}")
        mode = self.resolved_kv_mode
        allowed = kv_mode(mode).bits
        if self.kv_bits not in allowed:
            _fail(f"kv_bits={self.kv_bits} is not supported by kv_mode={mode!r} (supported: {allowed})")
        if self.kv_rotate is not None and not isinstance(self.kv_rotate, bool):
            _fail(f"kv_rotate must be True, False or None (auto), got {self.kv_rotate!r}")
        if self.k_center is not None and not isinstance(self.k_center, bool):
            _fail(f"k_center must be True, False or None (auto), got {self.k_center!r}")
        if self.k_center and self.resolved_kv_mode != "static":
            _fail(f"k_center=True centers the keys of the static KV cache: it needs kv_mode 'static' (kv_bits < 16 "
                  f"and static activations, or kv_mode='static'), got kv_mode {mode!r}")
        if not (isinstance(self.eta, (int, float)) and self.eta > 1):
            _fail(f"eta must be a number > 1 (outlier: max|x| > eta x the sequence median), got {self.eta!r}")
        for name in ("kv_window", "max_prefix_len", "calib_samples", "calib_seq_len", "max_calib_rows", "gptq_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _fail(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.finetune, bool) or not isinstance(self.finetune_weights, bool):
            _fail(f"finetune and finetune_weights must be True or False, got {self.finetune!r} / "
                  f"{self.finetune_weights!r}")
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs <= 0:
            _fail(f"finetune_epochs must be a positive int, got {self.finetune_epochs!r}")
        for name in ("finetune_lr", "finetune_weight_lr"):
            v = getattr(self, name)
            if v is None and name == "finetune_weight_lr":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1):
                _fail(f"{name} must be a number in (0, 1), got {v!r}")
        if self.finetune and self.act_quant != "static":
            _fail("finetune=True learns static activation scales: it needs act_quant='static'")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) or not (
                0 < self.gptq_damp < 1):
            _fail(f"gptq_damp must be a number in (0, 1), got {self.gptq_damp!r}")
        if self.prefix_tokens is not None:
            if not self.prefix:
                _fail("prefix_tokens given but prefix=False")
            if not isinstance(self.prefix_tokens, (list, tuple)):
                _fail(f"prefix_tokens must be a list of token ids, got {type(self.prefix_tokens).__name__}",
                      TypeError)
            toks = list(self.prefix_tokens)
            if not toks or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in toks):
                _fail(f"prefix_tokens must be a non-empty list of token ids (ints >= 0), got {self.prefix_tokens!r}")
            self.prefix_tokens = toks
        if self.version != CONFIG_VERSION:
            _fail(f"version {self.version} is not supported by this package (version {CONFIG_VERSION})")

    @property
    def resolved_kv_mode(self) -> str:
        if self.kv_bits == 16:
            return "fp16"
        if self.kv_mode == "auto":
            return "static" if self.act_quant == "static" else "dynamic"
        return self.kv_mode

    @property
    def resolved_kv_rotate(self) -> bool:
        if self.kv_rotate is None:
            return self.rotate and self.kv_bits <= 4 and self.resolved_kv_mode in ("static", "dynamic")
        return self.kv_rotate

    @property
    def resolved_k_center(self) -> bool:
        if self.k_center is None:
            return self.resolved_kv_mode == "static" and self.kv_bits <= 4
        return self.k_center

    @property
    def resolved_weight_method(self) -> str:
        if self.weight_method == "auto":
            return "gptq" if self.w_bits == 4 else "rtn"
        return self.weight_method

    @property
    def resolved_finetune_weight_lr(self) -> float:
        if self.finetune_weight_lr is None:
            return 5e-4 if self.w_bits == 4 else 5e-5
        return self.finetune_weight_lr

    @property
    def name(self) -> str:
        kv = "KV16" if self.kv_bits == 16 else f"KV{self.kv_bits}"
        return (f"W{self.w_bits}A{self.a_bits}{kv} {self.act_quant}" + (" +prefix" if self.prefix else "")
                + (" +rot" if self.rotate else "") + (" +kvrot" if self.resolved_kv_rotate else "")
                + (" +kcenter" if self.resolved_k_center else "")
                + ((" +ft" if self.finetune_weights else " +ft-scales") if self.finetune else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        # written before kv_rotate / k_center existed: no KV rotation, no key offsets in that checkpoint (kv_window:
        # its default, 32)
        d = {"kv_rotate": False, "k_center": False, **d}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            _fail(f"unknown fields {sorted(unknown)} (a checkpoint from another version?)")
        return cls(**d)
