"""Builds the native CPU backend (csrc/) as a torch extension, rlsc_kernels._native.

The package metadata lives in pyproject.toml; this file only adds the extension. The build needs
the torch it will run with, so install with `pip install --no-build-isolation` (build isolation
would fetch a second torch from PyPI). Where torch is not importable at build time, no C++
compiler is present or the compile fails, the package installs without the extension:
backend="auto" then uses the PyTorch backend on CPU and backend="native" raises.
"""
import os
import sys

from setuptools import setup

NATIVE = "rlsc_kernels._native"


def _native_build():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing at build time (e.g. an isolated build)
        print(f"rlsc-kernels: building without the native CPU backend (torch not importable: {e})", file=sys.stderr)
        return {}, {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the package without the native backend instead of failing."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                print(f"rlsc-kernels: the native CPU backend failed to build ({type(e).__name__}: {e}); "
                      "installing without it", file=sys.stderr)

        def run(self):
            try:
                super().run()
            except Exception as e:
                print(f"rlsc-kernels: the native CPU backend failed to build ({type(e).__name__}: {e}); "
                      "installing without it", file=sys.stderr)

    # -fno-trapping-math lets the compiler if-convert the row loops (it vectorises them then);
    # results are unchanged (no code here inspects floating-point exception flags).
    # -ffp-contract=off: z - max must be exactly 0 at the max (an FMA would keep the residual of
    # rounding z), so a one-token distribution gets logp 0 and p 1 exactly.
    extra = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
    ext = CppExtension(
        NATIVE,
        [os.path.join("csrc", "rlsc_native.cpp")],
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp", "-ldl"],
    )
    return {"ext_modules": [ext]}, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_kwargs, cmdclass = _native_build()
setup(cmdclass=cmdclass, **ext_kwargs)
