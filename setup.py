"""Build of prefixquant_kernels' C++ extension (prefixquant_kernels._C).

Install torch first, then build against it without an isolated build environment (an isolated one
would download a second, multi-GB torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The CPU kernels (csrc/cpu) always build. The kernel files include no torch header; only
torch_ops.cpp does, so editing a kernel recompiles one small file (ninja tracks it).
If no C++ compiler works, the package still installs and runs on its PyTorch reference path
(set PQK_NO_EXTENSION=1 to skip the build on purpose).

PQK_FORCE_CUDA=1 also builds the CUDA kernels (csrc/cuda) with nvcc into prefixquant_kernels/libpqk_cuda.so
(sm_80/86/89/90, static cudart, warnings as errors; no GPU and no CUDA build of torch needed). Without it nothing
CUDA is built and the build is exactly the CPU one.
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
    # at::parallel_for is a header template: with torch's OpenMP backend its `#pragma omp parallel` is compiled into
    # *this* extension, and without -fopenmp it silently runs every kernel on one thread (tests/cpu/test_threads.py).
    # Linking -fopenmp names libgomp.so.1, which resolves to the copy torch has already loaded (same soname).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return CppExtension("prefixquant_kernels._C", sources, extra_compile_args={"cxx": flags + openmp},
                        extra_link_args=openmp)


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
    base = BuildExtension.with_options(use_ninja=True)
    if os.environ.get("PQK_FORCE_CUDA") != "1":
        return [cpu_extension()], {"build_ext": base}
    return [cpu_extension()], {"build_ext": cuda_build_ext(base)}


def cuda_build_ext(base):
    """build_ext that also runs prefixquant_kernels/cuda_build.py (loaded by path: the package is not importable
    while it is being built) and puts libpqk_cuda.so next to the package's modules."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pqk_cuda_build", os.path.join(ROOT, "prefixquant_kernels",
                                                                                  "cuda_build.py"))
    cuda_build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cuda_build  # its dataclass looks its module up there
    spec.loader.exec_module(cuda_build)

    class BuildExtWithCuda(base):
        def run(self):
            super().run()
            if cuda_build.nvcc_path() is None:
                raise RuntimeError("PQK_FORCE_CUDA=1 but nvcc was not found (PATH or CUDA_HOME)")
            out = os.path.join(ROOT if self.inplace else self.build_lib, "prefixquant_kernels")
            built = cuda_build.build_library(cuda_build.ARCHS)
            self.copy_file(built.lib, os.path.join(out, cuda_build.LIB_NAME))

    return BuildExtWithCuda


ext_modules, cmdclass = extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
