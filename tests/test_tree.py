"""The source tree keeps the shape README's "Where things are" describes: every module imports only from its own
layer or the layers below it (format -> kernels -> ops -> nn -> cache -> models -> calibration -> commands), and
every file path a comment or doc cites exists."""
import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "prefixquant_kernels"

# Layer of each module, lowest first; a module may import from its own layer and those below it (lazy imports
# inside functions included: a lazy upward import is still an upward import).
LAYERS = [
    ("format", ["format", "kv_format", "reference", "hadamard", "_extension", "cuda_build", "data"]),
    ("kernels", ["triton"]),
    ("ops", ["ops"]),
    ("nn", ["nn"]),
    ("cache", ["cache"]),
    ("config", ["config"]),
    ("models", ["models"]),
    ("calibration", ["calibration"]),
    ("serving", ["serving"]),
    ("commands", ["__init__", "__main__", "cli", "demo", "layer_demo", "model_demo", "selftest"]),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _modules():
    for dirpath, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                yield rel


def _top(parts):
    """The first-level entry under the package a module (as a list of names) belongs to."""
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(parts):
    """Absolute dotted names of the package's modules that the module `parts` imports anywhere in its body."""
    path = os.path.join(ROOT, *parts) + ".py"
    tree = ast.parse(open(path).read(), path)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name.split(".") for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            else:
                base = []
            mod = base + (node.module.split(".") if node.module else [])
            if not mod or mod[0] != PKG:
                continue
            if len(mod) == 1:       # from prefixquant_kernels import x / from .. import x: x is the submodule
                out += [[PKG, a.name] for a in node.names]
            else:
                out.append(mod)
    return out


def _violations():
    bad = []
    for parts in _modules():
        me = _top(parts)
        assert me in RANK, f"{'/'.join(parts)}.py: {me!r} is in no layer of tests/test_tree.py's LAYERS"
        for target in _imports(parts):
            them = _top(target)
            if them in RANK and RANK[them] > RANK[me]:
                bad.append(f"{'/'.join(parts)}.py imports {'.'.join(target)} ({LAYERS[RANK[me]][0]} -> "
                           f"{LAYERS[RANK[them]][0]})")
    return bad


def test_no_module_imports_from_a_layer_above_its_own():
    assert _violations() == []


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a module of ops/ importing calibration/ is reported."""
    planted = os.path.join(ROOT, PKG, "ops", "_planted_upward_import.py")
    with open(planted, "w") as f:
        f.write("def f():\n    from ..calibration import config  # noqa\n")
    try:
        assert any("_planted_upward_import" in v and "ops -> calibration" in v for v in _violations())
    finally:
        os.remove(planted)


# ---- cited paths -------------------------------------------------------------------------------------------------

# Files that comments cite and that belong to other projects (never in this tree).
EXTERNAL = {
    "main.py", "quantize/block_ap.py", "quantize/quantizer.py", "quantizer.py", "int_linear_fake.py",
    "utils/quant_utils.py", "utils/rotation_utils.py", "quantize/int_linear_fake.py", "quantize/quant_norm.py",
    "utils/hadamard_utils.py",                                     # PrefixQuant's training code
    "sage/combinat/matrices/hadamard_matrix.py",                  # SageMath (hadamard.py's source of H_m)
    "ATen/Parallel.h", "torch/extension.h", "torch/library.h",     # PyTorch's C++ headers
    "cutlass.h", "cutlass/cutlass.h", "gemm_universal.h",          # CUTLASS's headers (the nvidia-cutlass wheel)
    "avx512fintrin.h",                                             # GCC's AVX-512 intrinsics header
    "llama.cpp",                                                   # the project (a peer), not a file
}
# Output files that tests and benchmarks write (names, not citations).
WRITTEN = {"out.md", "k.md", "prof.md", "e2e.md", "layer.md", "model.md"}
CITED = re.compile(r"(?<![\w./<*-])((?:[A-Za-z_][\w.-]*/)*[A-Za-z_][\w-]*\.(?:py|cpp|h|cuh|cu|md|sh|toml))(?![\w/])")
INCLUDE = re.compile(r"^\s*#\s*include\s*<")


def _tracked():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.split() if os.path.exists(os.path.join(ROOT, f))]


def _missing_citations(files):
    names = {os.path.basename(f) for f in files}
    missing = []
    for f in files:
        if (not f.endswith((".py", ".cpp", ".h", ".cuh", ".cu", ".md", ".toml")) or f.startswith("tests/fixtures/")
                or f == "tests/test_tree.py"):   # this file names the files its checks plant
            continue
        for n, line in enumerate(open(os.path.join(ROOT, f), errors="replace"), 1):
            if INCLUDE.match(line):
                continue
            for m in CITED.finditer(line):
                p = m.group(1)
                if p in EXTERNAL or p in WRITTEN:
                    continue
                found = p in names if "/" not in p else any(x == p or x.endswith("/" + p) for x in files)
                if not found:
                    missing.append(f"{f}:{n}: {p}")
    return missing


def test_every_cited_file_exists():
    assert _missing_citations(_tracked()) == []


def test_the_citation_check_sees_a_missing_file():
    files = _tracked()
    assert "csrc/cuda/tests/gemm_harness.cpp" in files
    # plant: a comment citing a file that is not there
    planted = os.path.join(ROOT, "tests", "_planted_citation.py")
    with open(planted, "w") as f:
        f.write("# see csrc/cuda/tests/host_harness.cpp\n")
    try:
        missing = _missing_citations(files + ["tests/_planted_citation.py"])
        assert [m for m in missing if "_planted" in m] == [
            "tests/_planted_citation.py:1: csrc/cuda/tests/host_harness.cpp"]
    finally:
        os.remove(planted)


def test_external_citations_are_not_files_of_this_tree():
    files = set(_tracked())
    assert not [p for p in EXTERNAL if any(x == p or x.endswith("/" + p) for x in files)]
