"""The README promises two commands; CI must run exactly the test one."""
import os
import re

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
