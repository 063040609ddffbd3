"""mpilayer: layered-resolution (successive refinement) matrix multiplication.

``layered_matmul(A, B)`` yields a coarse, certified estimate of ``A @ B`` first and refines it,
resolution by resolution, to the exact product of the quantised operands. The MPI run
(``mpiexec -n N mpilayer matmul ...``) distributes the same computation over ranks.
"""
from .components import ComponentSplit, default_component_bits, make_split
from .layered import LayeredProduct, Resolution, layered_matmul
from .quantize import quantization_error_bound, quantize

__all__ = [
    "ComponentSplit", "LayeredProduct", "Resolution", "default_component_bits",
    "layered_matmul", "make_split", "quantization_error_bound", "quantize",
]
__version__ = "0.1.0"
