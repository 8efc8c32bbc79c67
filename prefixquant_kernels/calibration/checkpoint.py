"""save_quantized / load_quantized: a quantized model as a directory of

    config.json          the transformers model config (its ``dtype``: the dtype the model computes in)
    pqk_config.json      format + version, the QuantConfig, the prefix state's layout, every QuantLinear's shape,
                         the form of every RotatedLinear's rotation ("rotations": {name: "hadamard" | "dense"};
                         a checkpoint without the key holds dense rotations), and the directory's own files
                         ("files": what overwrite=True may replace; absent in checkpoints written before it)
    model.safetensors    every tensor: packed int4 / int8 weights, fp32 scales and biases of the quantized
                         linears; the embedding, lm_head and norms in 16 bits (save_quantized's float_dtype;
                         checkpoints written before stored them in fp32 and still load); the 16-bit prefix
                         K/V, the per-head KV scales and the Q/K rotation of kv_rotate, the down_proj
                         rotations (signs [I] of the Hadamard form, or a dense [I, I])
                         (tied tensors stored once)
    tokenizer files      when a tokenizer is given to save_quantized

Writes are atomic (atomic_directory): the files go to a temporary directory beside the target, which is renamed
into place only when complete; an existing target is never written into, and replaced only with overwrite=True
when it holds a pqk checkpoint and nothing else (a user's file beside it keeps the whole directory as it is).

load_quantized rebuilds the model from config.json (no float weights needed), puts empty QuantLinears and the
prefix state in place, then loads every tensor strictly: a checkpoint of another shape or config is an error.
Module names are the model's own (the family's ArchSpec, models/arch.py, says which linears are quantized), so a
checkpoint written before the layout moved into ArchSpec names the same modules and loads unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys

import torch

from ..models.arch import float_linears, get_spec
from ..models.patch import swap
from ..models.state import PrefixQuantState
from ..nn import QuantLinear
from .config import QuantConfig

FORMAT = "prefixquant-kernels"
FORMAT_VERSION = 1
_META = "pqk_config.json"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def _fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{op}: {msg}")


# ---- where a checkpoint may be written -------------------------------------------------------------------------

def target_problem(path, overwrite: bool = False) -> tuple[type[Exception], str, bool] | None:
    """Why the directory ``path`` cannot receive a checkpoint now, or None if it can: (exception type, message,
    whether overwrite=True would allow it). A checkpoint may go to a path that does not exist (its missing parent
    directories are created), to an empty directory, or, with ``overwrite``, to a directory holding a pqk checkpoint
    (pqk_config.json): anything else (a file, a directory with other files, a parent that is a file or not
    writable) is refused. Cheap: the CLI asks before loading the model, the writers again before they write and
    just before they rename."""
    if os.fspath(path) in ("", b""):
        return ValueError, "path is empty (it would mean the working directory)", False
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return NotADirectoryError, f"{path} exists and is not a directory", False
        entries = os.listdir(path)
        if entries:
            if not overwrite:
                return FileExistsError, f"{path} is not empty ({len(entries)} entries)", os.path.exists(
                    os.path.join(path, _META))
            if not os.path.exists(os.path.join(path, _META)):
                return FileExistsError, (f"{path} is not empty and holds no pqk checkpoint (no {_META}); refusing to "
                                         "replace it"), False
            foreign = _foreign_entries(path, entries)
            if foreign:
                return FileExistsError, (f"{path} holds a pqk checkpoint and more ({', '.join(foreign[:3])}"
                                         f"{', ...' if len(foreign) > 3 else ''}): refusing to replace files that are "
                                         "not the checkpoint's"), False
        parent = os.path.dirname(path)
    else:
        parent = os.path.dirname(path)
        while not os.path.lexists(parent):                 # the nearest existing ancestor: created from there
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return NotADirectoryError, f"{parent} is not a directory (in {path})", False
    if not os.access(parent, os.W_OK | os.X_OK):
        return PermissionError, f"{parent} is not writable", False
    return None


# The files an older checkpoint (without the list in pqk_config.json) may hold: its own three, and what
# config.save_pretrained / a tokenizer's save_pretrained write.
_OLD_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
                        r"preprocessor_config|chat_template)\.json|model\.safetensors|merges\.txt|vocab\.\w+|"
                        r"tokenizer\.model|spiece\.model|chat_template\.jinja")


def _foreign_entries(path: str, entries: list[str]) -> list[str]:
    """The entries of the checkpoint directory ``path`` that are not its files, sorted: everything past the
    ``files`` list its pqk_config.json holds (written since that list exists), else past _OLD_FILES and any
    directory; all of them if pqk_config.json is not a pqk checkpoint's (a foreign file of that name)."""
    try:
        with open(os.path.join(path, _META)) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return sorted(entries)
    files = meta.get("files")
    if isinstance(files, list):
        return sorted(e for e in entries if e not in files)
    return sorted(e for e in entries if e != _META and (os.path.isdir(os.path.join(path, e)) or
                                                       not _OLD_FILES.fullmatch(e)))


def check_target(path, overwrite: bool, op: str) -> None:
    """target_problem as an exception (``pqk.<op>: ...``) naming ``overwrite=True`` where it would help."""
    problem = target_problem(path, overwrite)
    if problem is not None:
        exc, msg, fixable = problem
        _fail(op, msg + ("; pass overwrite=True to replace the checkpoint in it" if fixable else ""), exc)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:          # a file system without fsync on directories: nothing more can be done
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, op: str = "save_quantized"):
    """Yield a new temporary directory beside ``path`` (``.<name>.pqk-tmp-*`` in the same parent) to write a
    checkpoint into; when the block ends normally every file and the directory are fsync'd and it is renamed to
    ``path`` (an existing checkpoint, allowed by ``overwrite``, is swapped out in one rename where the OS can
    (renameat2), else renamed aside first, and then removed). If the block raises anything (KeyboardInterrupt too)
    the temporary directory is removed and ``path`` is left exactly as it was. A process killed outright (SIGKILL,
    power loss) can leave the hidden temporary directory behind, never a half-written ``path``."""
    check_target(path, overwrite, op)   # as given: "" is refused, not read as the working directory
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.pqk-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    old = None
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync(os.path.join(root, f))
            _fsync(root)
        check_target(path, overwrite, op)              # again: the target may have changed while we wrote
        if os.path.isdir(path) and os.listdir(path):    # an old checkpoint, to be replaced
            if _exchange(tmp, path):
                old = tmp                               # path is the new checkpoint, tmp the old one
            else:
                old = tmp + ".old"
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    old = None
                    raise
        else:
            os.rename(tmp, path)                        # absent, or an empty directory (replaced by the rename)
        _fsync(parent)
    except BaseException:
        if old is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- writing ---------------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _float_dtype(model, float_dtype, op: str):
    """-> the dtype the float tensors are stored in, or None to keep them as they are (float32)."""
    import torch

    name = str(float_dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        _fail(op, f"float_dtype must be one of {FLOAT_DTYPES} (or the torch dtype), got {float_dtype!r}")
    if name == "float32":
        return None
    if name == "auto":
        cfg = model.config.to_dict()
        cfg = cfg.get("dtype", cfg.get("torch_dtype"))      # (transformers 5 / 4; reading torch_dtype warns)
        name = str(cfg).removeprefix("torch.") if cfg is not None else ""
        name = name if name in ("bfloat16", "float16") else "bfloat16"
    return getattr(torch, name)


def _tensors(model, float_dtype, op: str) -> tuple[dict, dict]:
    """The state dict to write (tied tensors once; ``metadata`` names the dropped aliases as safetensors'
    save_model does) with the float tensors outside the quantized modules (embedding, lm_head, norms) in
    ``float_dtype``; QuantLinear / RotatedLinear / pqk_state tensors are written exactly as they are."""
    import torch

    from ..models.rotated_linear import RotatedLinear
    from ..models.state import PrefixQuantState

    try:
        from safetensors.torch import _remove_duplicate_names
    except ImportError:            # an older / newer safetensors without the helper: group by storage ourselves
        _remove_duplicate_names = None
    sd = model.state_dict()
    metadata = {"format": FORMAT}
    if _remove_duplicate_names is not None:
        drops = _remove_duplicate_names(sd)
    else:
        groups: dict = {}
        for k, v in sd.items():
            groups.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride()),
                              []).append(k)
        drops = {g[0]: g[1:] for g in groups.values() if len(g) > 1}
    for kept, dropped in drops.items():
        for k in dropped:
            metadata.setdefault(k, kept)
            del sd[k]
    kept_exact = tuple(name + "." for name, m in model.named_modules()
                       if isinstance(m, (QuantLinear, RotatedLinear, PrefixQuantState)))
    target = _float_dtype(model, float_dtype, op)
    out = {}
    for k, v in sd.items():
        if target is not None and v.dtype in (torch.float32, torch.float64) and not k.startswith(kept_exact):
            w = v.to(target)
            if target == torch.float16 and not torch.isfinite(w).all() and torch.isfinite(v).all():
                _fail(op, f"{k} has values beyond float16's range: use float_dtype='bfloat16' or 'float32'")
            v = w
        out[k] = v.contiguous()
    return out, metadata


def _write(model, d: str, tokenizer, float_dtype, op: str) -> dict:
    """Write the checkpoint's files into the directory ``d`` -> pqk_config.json's content, which write_checkpoint
    writes last (with the list of the files)."""
    from safetensors import torch as st

    from ..models.rotated_linear import RotatedLinear

    modules = {name: {"in_features": m.in_features, "out_features": m.out_features, "w_bits": m.w_bits,
                      "a_bits": m.a_bits, "bias": m.bias is not None, "static": m.is_static}
               for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = model.pqk_state
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model.config.model_type,
            "quant_config": state.cfg.to_dict(), "state": state.layout(), "modules": modules,
            "rotations": {name: m.form for name, m in model.named_modules() if isinstance(m, RotatedLinear)}}
    tensors, metadata = _tensors(model, float_dtype, op)
    model.config.save_pretrained(d)
    cfg_file = os.path.join(d, _CONFIG)
    with open(cfg_file) as f:
        config = json.load(f)
    if config.get("dtype") is None:     # the dtype the model computes in, not the 16-bit one its tensors are stored
        emb = model.get_input_embeddings()  # in: from_pretrained's dtype="auto" would otherwise take the file's
        config["dtype"] = str(emb.weight.dtype).removeprefix("torch.")
        with open(cfg_file, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    st.save_file(tensors, os.path.join(d, _WEIGHTS), metadata=metadata)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(d)
    return meta


def write_checkpoint(model, path, tokenizer, *, overwrite: bool, float_dtype, op: str, finish=None) -> None:
    """save_quantized / export_hf: everything checked, then written atomically (atomic_directory);
    ``finish(dir, meta)`` may add to the files before they are committed."""
    if getattr(model, "pqk_state", None) is None:
        _fail(op, "the model is not quantized (no pqk_state): run pqk.quantize_model first")
    if not isinstance(overwrite, bool):
        _fail(op, f"overwrite must be True or False, got {overwrite!r}", TypeError)
    _runtime_transforms(model, op)
    _float_dtype(model, float_dtype, op)
    with atomic_directory(path, overwrite=overwrite, op=op) as d:
        meta = _write(model, d, tokenizer, float_dtype, op)
        if finish is not None:
            finish(d, meta)
        # the list of the checkpoint's own files: what a later overwrite may replace, and nothing else
        meta["files"] = sorted(os.listdir(d) + [_META])
        with open(os.path.join(d, _META), "w") as f:
            json.dump(meta, f, indent=1, default=str)


def _runtime_transforms(model, op: str) -> None:
    """fuse_mlps and quantize_lm_head change a loaded model for speed; a checkpoint holds the model before them
    (load_quantized rebuilds that layout, then they can be applied again). Saved after them, it would not load."""
    from ..nn.quant_mlp import QuantGatedMLP

    fused = [name for name, m in model.named_modules() if isinstance(m, QuantGatedMLP)]
    if fused:
        _fail(op, f"the model's MLPs were fused by pqk.fuse_mlps ({fused[0]}, ...): save it before fusing (or "
                  "from a fresh load_quantized) and apply fuse_mlps after loading")
    if isinstance(model.get_output_embeddings(), QuantLinear):
        _fail(op, "the lm_head was quantized by pqk.quantize_lm_head: save the model before that and apply it "
                  "after loading")


def save_quantized(model, path, tokenizer=None, *, overwrite: bool = False, float_dtype="auto") -> None:
    """Write a model quantized by quantize_model to the directory ``path`` (module doc), atomically: into a
    temporary directory beside ``path``, renamed into place only when complete and fsync'd; an error or Ctrl-C
    leaves ``path`` as it was.

    path: must not exist (parents are created) or be an empty directory; with ``overwrite=True`` it may also hold
        a pqk checkpoint, which is replaced as a whole (FileExistsError otherwise; a directory holding anything but
        a pqk checkpoint's files is never replaced). The model as quantize_model or load_quantized left it: after
        fuse_mlps or quantize_lm_head (runtime transforms, applied again after loading) it is refused.
    float_dtype: the dtype of the tensors that stay float outside the quantized modules (embedding, lm_head, norms):
        "auto" (default) = the model config's ``dtype`` if it is 16-bit, else bfloat16; or "bfloat16", "float16",
        "float32" (exactly the fp32 values; the checkpoint is about twice as large for a small model). Packed
        weights, scales, rotations and the prefix K/V are always stored exactly. A model loaded from a 16-bit
        checkpoint computes in config.json's dtype (float32 for a model quantized in float32): the same as the
        model saved with its float tensors rounded to 16 bits.
    """
    write_checkpoint(model, path, tokenizer, overwrite=overwrite, float_dtype=float_dtype, op="save_quantized")


# ---- reading ---------------------------------------------------------------------------------------------------

def _read_json(path: str, op: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        _fail(op, f"{path} is not valid JSON ({e}): a corrupt or truncated checkpoint")
    except UnicodeDecodeError as e:
        _fail(op, f"{path} is not a JSON text file ({e}): a corrupt checkpoint")
    if not isinstance(data, dict):
        _fail(op, f"{path} holds a JSON {type(data).__name__}, not an object: a corrupt checkpoint")
    return data


def _read_meta(path: str) -> dict:
    if not os.path.exists(path):
        _fail("load_quantized", f"{path!r} does not exist", FileNotFoundError)
    if not os.path.isdir(path):
        _fail("load_quantized", f"{path!r} is not a directory (a checkpoint is a directory)", NotADirectoryError)
    f = os.path.join(path, _META)
    if not os.path.exists(f):
        _fail("load_quantized", f"{path!r} has no {_META}: not a checkpoint written by pqk.save_quantized",
              FileNotFoundError)
    meta = _read_json(f, "load_quantized")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        _fail("load_quantized", f"{f} is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                                f"this package reads {FORMAT!r} version {FORMAT_VERSION}")
    for name in (_CONFIG, _WEIGHTS):
        if not os.path.exists(os.path.join(path, name)):
            _fail("load_quantized", f"{path!r} has {_META} but no {name}: an incomplete checkpoint",
                  FileNotFoundError)
    _read_json(os.path.join(path, _CONFIG), "load_quantized")
    return meta


def load_quantized(path, *, device: str | torch.device = "cpu"):
    """Rebuild the quantized model saved at ``path`` (module doc) -> the model, in eval mode. Reads checkpoints
    whose float tensors are stored in 16 bits (they are converted to config.json's dtype) and older all-fp32
    ones. ValueError / FileNotFoundError naming the file for a missing, incomplete, corrupt or foreign one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    meta = _read_meta(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != meta["model_type"]:
        _fail("load_quantized", f"config.json is model_type {config.model_type!r} but {_META} says "
                                f"{meta['model_type']!r}: files from different checkpoints")
    model = AutoModelForCausalLM.from_config(config).eval()
    build_skeleton(model, meta, "load_quantized")
    try:
        load_model(model, os.path.join(path, _WEIGHTS), strict=True, device=str(device))
    except SafetensorError as e:
        _fail("load_quantized", f"{os.path.join(path, _WEIGHTS)} is truncated or corrupt ({e})")
    except RuntimeError as e:
        _fail("load_quantized", f"tensors in {_WEIGHTS} do not match the model its config builds: {e}")
    return model.to(device).eval()


def build_skeleton(model, meta: dict, op: str) -> None:
    """Put empty QuantLinears (and RotatedLinear wrappers) and an empty ``pqk_state`` into a float ``model`` built
    from the checkpoint's config (usually on the meta device), as described by ``meta`` (pqk_config.json's
    content). Nothing is changed before every check passed. Used by load_quantized and by the
    transformers quantizer (hf_quantizer.py), which fills the same skeleton through from_pretrained."""
    from ..models.rotated_linear import FORMS, RotatedLinear

    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        _fail(op, f"quantization_config is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                  f"this package reads {FORMAT!r} version {FORMAT_VERSION} (re-export with pqk.export_hf)")
    for key in ("model_type", "quant_config", "state", "modules"):
        if key not in meta:
            _fail(op, f"quantization_config has no {key!r}: not written by pqk.export_hf")
    if model.config.model_type != meta["model_type"]:
        _fail(op, f"config.json is model_type {model.config.model_type!r} but its quantization_config says "
                  f"{meta['model_type']!r}: files from different checkpoints")
    get_spec(model)
    cfg = QuantConfig.from_dict(meta["quant_config"])
    linears = float_linears(model)               # names before the down_proj wrappers: "...mlp.down_proj"
    expected = {n.removesuffix(".linear") for n in meta["modules"]}
    if set(linears) != expected:
        _fail(op, f"the checkpoint's quantized modules do not match a {model.config.model_type} with "
                  f"{model.config.num_hidden_layers} layers (checkpoint from another config?)")
    forms = meta.get("rotations", {})      # absent: written before the Hadamard form existed, all dense
    rotated = {n.removesuffix(".linear") for n in meta["modules"] if n.endswith(".linear")}
    if not isinstance(forms, dict) or set(forms) - rotated or set(forms.values()) - set(FORMS):
        _fail(op, f"pqk_config's 'rotations' must map rotated modules ({sorted(rotated)[:2]}...) to one of {FORMS}, "
                  f"got {forms!r}")
    replacements = {}
    for name, m in meta["modules"].items():
        lin = linears[name.removesuffix(".linear")]
        if (lin.in_features, lin.out_features, lin.bias is not None) != (m["in_features"], m["out_features"],
                                                                          m["bias"]):
            _fail(op, f"{name}: checkpoint has [{m['out_features']}, {m['in_features']}] bias={m['bias']}, the "
                      f"config builds [{lin.out_features}, {lin.in_features}] bias={lin.bias is not None}")
        q = QuantLinear(m["in_features"], m["out_features"], w_bits=m["w_bits"], a_bits=m["a_bits"],
                        bias=m["bias"], static=m["static"])
        if name.endswith(".linear"):    # a rotated linear (down): its signs / rotation load with the other tensors
            base = name.removesuffix(".linear")
            try:
                replacements[base] = RotatedLinear.empty(q, forms.get(base, "dense"), lin.in_features,
                                                         lin.weight.device)
            except ValueError as e:
                _fail(op, f"{base}: {e}")
        else:
            replacements[name] = q
    lay = meta["state"]
    state = PrefixQuantState(cfg, lay["num_layers"], lay["num_kv_heads"], lay["head_dim"], lay["prefix_len"],
                             lay["bos_id"], lay.get("info"))
    swap(model, replacements, state)
