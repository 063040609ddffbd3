"""Components on the wire: a field's raw bits for every element, in the smallest buffer.

Packed bit planes for narrow fields (a 1-bit component costs 1/8 byte per element), uint8 or
uint16 otherwise. Pure numpy and the compiled encoder; the MPI messages carrying these buffers
are protocol.py's.
"""
from __future__ import annotations

import numpy as np

from mpilayer.core.components import BitField

PACKED_MAX_WIDTH = 3


def _unsigned(values: np.ndarray) -> np.ndarray:
    """uint8/uint16 view of int8/int16 storage: bit operations without widening."""
    return values.view(np.uint8 if values.itemsize == 1 else np.uint16)


def encode_component(values: np.ndarray, field: BitField) -> np.ndarray:
    """The raw bits of ``field`` for every element, in the smallest buffer: packed planes for
    widths <= 3 (width/8 bytes per element), else uint8/uint16. 2-D int8/int16 blocks go
    through one compiled pass (``_kernels.encode_fields``), identical to
    :func:`encode_component_numpy`."""
    if values.ndim == 2 and values.dtype in (np.int8, np.int16):
        from mpilayer import _kernels
        return _kernels.encode_fields(values, [(field.lo, field.width)])[0]
    return encode_component_numpy(values, field)


def encode_component_numpy(values: np.ndarray, field: BitField) -> np.ndarray:
    """:func:`encode_component` in numpy (the reference of the compiled pass)."""
    u = _unsigned(values)
    raw = (u >> field.lo) & u.dtype.type((1 << field.width) - 1)
    if field.width <= PACKED_MAX_WIDTH:
        if field.width == 1:
            return np.packbits(raw.astype(np.uint8, copy=False), axis=None)
        planes = np.stack([(raw >> p) & 1 for p in range(field.width)]).astype(np.uint8, copy=False)
        return np.packbits(planes, axis=None)
    return raw.astype(np.uint8 if field.width <= 8 else np.uint16, copy=False)


def decode_component(buf: np.ndarray, shape: tuple, field: BitField) -> np.ndarray:
    """Inverse of :func:`encode_component`: the field's raw (unsigned) bits, uint8 or uint16."""
    if field.width <= PACKED_MAX_WIDTH:
        size = int(np.prod(shape))
        bits = np.unpackbits(buf, count=size * field.width).reshape(field.width, *shape)
        raw = bits[0].copy()
        for p in range(1, field.width):
            raw |= bits[p] << p
        return raw
    return buf.reshape(shape)


def encoded_spec(shape: tuple, field: BitField) -> tuple:
    """``(count, dtype)`` of the buffer :func:`encode_component` makes for ``shape``."""
    size = int(np.prod(shape))
    if field.width <= PACKED_MAX_WIDTH:
        return (size * field.width + 7) // 8, np.uint8
    return size, (np.uint8 if field.width <= 8 else np.uint16)
