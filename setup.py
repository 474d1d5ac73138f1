"""Build the Cython fast path; everything else is in pyproject.toml.

Set FVD_NO_EXTENSION=1 to install only the pure-Python twin.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = []
if os.environ.get("FVD_NO_EXTENSION") != "1":
    extensions = cythonize(
        [
            Extension(
                "fvd._fastpath",
                ["fvd/_fastpath.pyx"],
                include_dirs=[numpy.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O2"],
            )
        ],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(ext_modules=extensions)
