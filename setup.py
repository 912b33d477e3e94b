"""Builds the optional C++ kernels, graph_rewrite/ops/csrc/*.cpp, against the torch in the build.

Everything else is in pyproject.toml. Where the build fails (no working C++ compiler, a torch it
cannot use) the install goes on without it and the package runs its Python kernels: same results,
slower per call.
"""
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # a build without torch: the Python kernels only
    ext_modules, cmdclass = [], {}
else:
    ext = CppExtension(
        "graph_rewrite.ops._lean_ops",
        ["graph_rewrite/ops/csrc/lean_ops.cpp", "graph_rewrite/ops/csrc/recompute_ops.cpp"],
        # cpp.py compares this with the running torch before loading the library.
        define_macros=[("GR_TORCH_VERSION", f'"{torch.__version__}"')],
        extra_compile_args=["-O2"],
        py_limited_api=False,
    )
    ext_modules = [ext]

    class OptionalBuild(BuildExtension.with_options(use_ninja=False)):
        """Any failure (no compiler, one torch cannot use) leaves the Python kernels, with a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001: torch's compiler checks raise more than the compile errors ``optional`` catches
                print(f"graph_rewrite: the C++ kernels were not built ({type(e).__name__}: {e}); "
                      "the Python kernels will run", file=sys.stderr)

    cmdclass = {"build_ext": OptionalBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
