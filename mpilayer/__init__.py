"""mpilayer: layered-resolution (successive refinement) matrix multiplication.

``layered_matmul(A, B)`` yields a coarse, certified estimate of ``A @ B`` first and refines it,
resolution by resolution, to the exact product of the quantised operands. The MPI run
(``mpiexec -n N mpilayer matmul ...``) distributes the same computation over ranks.

The public names load on first use, so that ``mpilayer``'s command line can set one BLAS
thread per rank before numpy is imported.
"""
import importlib

_EXPORTS = {
    "ComponentSplit": "components", "default_component_bits": "components", "make_split": "components",
    "LayeredProduct": "layered", "Resolution": "layered", "layered_matmul": "layered",
    "quantization_error_bound": "quantization", "quantize": "quantization",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mpilayer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
