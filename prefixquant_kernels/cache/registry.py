"""The KV cache modes by name: each mode's file (prefixquant_kernels/cache/modes/) registers its layer class with
``@register_kv_mode(name, bits=...)``; PrefixQuantCache, the cache factory, the model state and QuantConfig look
a mode up with ``kv_mode(name)`` and never name a layer class.

Contract: one canonical name per mode (an alias, e.g. "prefixquant" for "static", resolves to it and is never
listed as a mode of its own); ``bits`` are the widths the mode supports, the first one its default; ``options``
are the keyword arguments of PrefixQuantCache the mode takes, handed to ``layer.for_layers``. This module imports
neither torch nor transformers: the built-in modes are imported on the first lookup.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

# the layer constructor's arguments every mode has, not options of its own
_COMMON = ("self", "prefix_keys", "prefix_values", "bits", "backend")


@dataclass(frozen=True)
class KVMode:
    """A registered mode: ``layer`` builds the cache's layers (``layer.for_layers``)."""

    name: str
    layer: type
    bits: tuple[int, ...]
    options: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    @property
    def default_bits(self) -> int:
        return self.bits[0]

    @property
    def preallocated(self) -> type | None:
        """The layer class of the mode's preallocated (compileable) form, or None: PrefixQuantCache(max_cache_len=)."""
        return getattr(self.layer, "preallocated", None)

    @property
    def static_scales(self) -> bool:
        """Whether the mode takes calibrated per-head KV scales (key_scales / value_scales), as "static" does."""
        return "key_scales" in self.options

    def spelled(self) -> str:
        """How messages name the mode: its alias first (the older public name), e.g. 'prefixquant' (= 'static')."""
        return f"{self.aliases[0]!r} (= {self.name!r})" if self.aliases else repr(self.name)


_MODES: dict[str, KVMode] = {}
_ALIASES: dict[str, str] = {}
_builtins_loaded = False


def _fail(msg: str, op: str):
    raise ValueError(f"pqk.{op}: {msg}")


def _constructor_options(cls) -> tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.name not in _COMMON
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def register_kv_mode(name: str, *, bits, options=None, aliases=()):
    """Class decorator: register ``cls`` (a cache.base.PrefixedLayer subclass) as the KV mode ``name``.

    bits: the supported widths, the first the default (the layer checks them: ``cls.supported_bits``).
    options: the PrefixQuantCache keyword arguments the mode takes; default: the layer constructor's own arguments
    (all but prefix_keys, prefix_values, bits, backend). aliases: other names that resolve to this mode.
    One class per mode: register a subclass to reuse a layer under a second name.
    """
    bits = tuple(bits)
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in bits):
        _fail(f"bits must be a non-empty sequence of positive ints, got {bits!r}", "register_kv_mode")
    taken = [n for n in (name, *aliases) if n in _MODES or n in _ALIASES or n == "auto"]
    if taken:
        _fail(f"{taken} already names a KV mode (or is 'auto', QuantConfig's)", "register_kv_mode")

    def register(cls):
        if "kv_mode" in cls.__dict__:
            _fail(f"{cls.__name__} is already registered as {cls.kv_mode!r}: register a subclass",
                  "register_kv_mode")
        opts = _constructor_options(cls) if options is None else tuple(options)
        _MODES[name] = KVMode(name, cls, bits, opts, tuple(aliases))
        for a in aliases:
            _ALIASES[a] = name
        cls.kv_mode, cls.supported_bits = name, bits
        return cls
    return register


def unregister_kv_mode(name: str) -> None:
    """Remove a mode and its aliases (e.g. a mode a test registered)."""
    spec = _MODES.pop(name)
    for a in spec.aliases:
        _ALIASES.pop(a, None)
    for attr in ("kv_mode", "supported_bits"):
        if attr in spec.layer.__dict__:
            delattr(spec.layer, attr)


def _modes_package():
    return importlib.import_module(f"{__package__}.modes")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        _modes_package().load_all()


def kv_modes() -> tuple[str, ...]:
    """The canonical names of every registered mode (aliases not included): the built-in ones in modes.ORDER,
    then the others in registration order."""
    _load_builtins()
    order = _modes_package().ORDER
    names = list(_MODES)
    return tuple(sorted(names, key=lambda n: (order.index(n) if n in order else len(order), names.index(n))))


def kv_mode_aliases() -> dict[str, str]:
    """alias -> canonical name."""
    _load_builtins()
    return dict(_ALIASES)


def kv_mode(name: str, *, op: str = "kv_mode") -> KVMode:
    """The mode registered as ``name`` (or whose alias it is); ValueError naming the known modes otherwise.
    op: the public function or class the message names (``pqk.<op>: ...``)."""
    _load_builtins()
    if isinstance(name, str):
        name = _ALIASES.get(name, name)
        if name in _MODES:
            return _MODES[name]
    aliases = ", ".join(f"{a!r} = {n!r}" for a, n in _ALIASES.items())
    _fail(f"mode must be one of {kv_modes()}" + (f" (aliases: {aliases})" if aliases else "") + f", got {name!r}", op)
