"""Build of prefixquant_kernels' C++ extension (prefixquant_kernels._C).

Install torch first, then build against it without an isolated build environment (an isolated one
would download a second, multi-GB torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The CPU kernels (csrc/cpu) always build. The kernel files include no torch header; only
torch_ops.cpp does, so editing a kernel recompiles one small file (ninja tracks it).
If no C++ compiler works, the package still installs and runs on its PyTorch reference path
(set PQK_NO_EXTENSION=1 to skip the build on purpose).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    flags = [
        "-O3",
        "-std=c++17",
        # fp32 epilogue math must be bit-exact with the PyTorch reference: no a*b+c contraction
        "-ffp-contract=off",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
    ]
    if os.environ.get("PQK_WERROR") == "1":
        flags.append("-Werror")
    return CppExtension("prefixquant_kernels._C", sources, extra_compile_args={"cxx": flags})


def extensions_and_cmdclass():
    if os.environ.get("PQK_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        sys.stderr.write(
            "prefixquant_kernels: torch is not importable in the build environment, so the C++ kernels are "
            "not built. Install torch first and use: pip install --no-build-isolation -e .\n"
        )
        return [], {}
    return [cpu_extension()], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
