"""Build of mpilayer's compiled kernels.

The kernel sources live in ``cython_kernels/`` and compile into one extension,
``mpilayer._kernels``. SIMD code paths are selected at run time (see
``cython_kernels/cpu_dispatch.h``), so the default build runs on any x86-64 and
builds on aarch64; ``MPILAYER_CFLAGS`` adds compiler flags, and
``MPILAYER_CYTHON_DEBUG=1`` turns Cython's bounds checks back on.
"""
import os
import shlex

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MPILAYER_CYTHON_DEBUG", "0") == "1"
EXTRA_CFLAGS = ["-O3", "-fno-strict-aliasing"] + shlex.split(os.environ.get("MPILAYER_CFLAGS", ""))


def get_extensions():
    kernels = Extension(
        "mpilayer._kernels",
        sources=[
            "cython_kernels/_kernels.pyx",
            "cython_kernels/bitplanes.c",
            "cython_kernels/int8_gemm.c",
            "cython_kernels/vnni_gemm.c",
            "cython_kernels/peaks.c",
            "cython_kernels/estimates.c",
            "cython_kernels/quantize.c",
        ],
        include_dirs=["cython_kernels", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=EXTRA_CFLAGS,
    )
    # The BLAS path lives apart so that only its users import scipy.linalg (see its docstring).
    blas_kernels = Extension(
        "mpilayer._blas_kernels",
        sources=["cython_kernels/_blas_kernels.pyx", "cython_kernels/int8_gemm.c"],
        include_dirs=["cython_kernels", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=EXTRA_CFLAGS,
    )
    return cythonize(
        [kernels, blas_kernels],
        include_path=["cython_kernels"],  # kernels_c.pxd: the C declarations _kernels.pyx cimports
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "nonecheck": False,
        },
    )


setup(
    packages=["mpilayer", "mpilayer.core", "mpilayer.io", "mpilayer.mpi", "mpilayer.apps", "mpilayer.cli",
              "mpilayer.jobs"],
    package_dir={"mpilayer": "mpilayer", "mpilayer.jobs": "jobs"},
    ext_modules=get_extensions(),
)
