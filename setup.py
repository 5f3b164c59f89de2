"""The optional compiled kernels (tallpack/_kernels.c). Everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds, and tallpack runs the same
loops in numpy and torch (tallpack/kernels.py), giving the same bits, more slowly.
"""

import os

from setuptools import Extension, setup

flags = [] if os.name == "nt" else ["-O3", "-ffp-contract=off", "-fopenmp-simd"]
setup(ext_modules=[Extension("tallpack._kernels", ["tallpack/_kernels.c"], extra_compile_args=flags, optional=True)])
