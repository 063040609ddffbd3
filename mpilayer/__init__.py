"""mpilayer: layered-resolution (successive refinement) matrix multiplication.

``layered_matmul(A, B)`` yields a coarse, certified estimate of ``A @ B`` first and refines it,
resolution by resolution, to the exact product of the quantised operands. The MPI run
(``mpiexec -n N mpilayer matmul ...``) distributes the same computation over ranks.

The public names load on first use, so that ``mpilayer``'s command line can set one BLAS
thread per rank before numpy is imported.
"""
import importlib

_EXPORTS = {
    "ComponentSplit": "core.components", "default_component_bits": "core.components",
    "make_split": "core.components", "LayeredProduct": "core.layered", "Resolution": "core.layered",
    "layered_matmul": "core.layered", "quantization_error_bound": "core.quantization",
    "quantize": "core.quantization",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mpilayer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
