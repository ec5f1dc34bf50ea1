"""Builds the optional C++ extension alignkit._C from csrc/ (pybind11, OpenMP, no torch).

If the compiler or OpenMP is missing the build is skipped (``optional=True``) and alignkit runs on
its torch path, warning once at import (alignkit.ops.backends).
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

compile_args = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
link_args = []
if sys.platform.startswith("linux") and not os.environ.get("ALIGNKIT_NO_OPENMP"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

ext = Pybind11Extension(
    "alignkit._C",
    ["csrc/bindings.cpp", "csrc/logprob_kernels.cpp"],
    include_dirs=["csrc"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17,
)
ext.optional = True

setup(ext_modules=[ext])
