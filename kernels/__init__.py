"""Numba kernels. Importing any of them first runs kernels/isa.py, which must choose the instruction set
(and Numba's target features) before the first `@njit` of the process."""

from kawai.kernels import isa as _isa  # noqa: F401  (first: see kernels/isa.py)
