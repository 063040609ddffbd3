"""Resolution components: how a signed fixed-point operand is split, most significant bits first.

A quantised operand q holds signed ``bits``-bit integers (two's complement). A split
``widths = (w_0, w_1, ...)`` with ``sum(widths) == bits`` cuts every value into components:
component j holds bits ``[shift_j, shift_j + w_j)`` of q, where ``shift_j = bits - (w_0 + ... + w_j)``.
Component 0 is signed (its top bit is q's sign bit, with negative weight); the others are
unsigned. Resolution r keeps the top r+1 components: ``truncated(q, r) = (q >> shift_r) << shift_r``,
so the part left out, ``q - truncated(q, r)``, always lies in ``[0, 2**shift_r - 1]``.

Every quantity used by the kernels is a *bit field* of q: the bits ``[lo, hi)`` read as an
integer (signed when ``hi == bits``, because it then contains the sign bit). Component r is the
field ``[shift_r, shift_r + w_r)``; the truncated operand of resolution r is ``[shift_r, bits)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class BitField:
    """Bits ``[lo, hi)`` of a ``bits``-bit two's-complement integer, read as an integer."""

    lo: int
    hi: int
    bits: int

    @property
    def width(self) -> int:
        return self.hi - self.lo

    @property
    def signed(self) -> bool:
        return self.hi == self.bits

    @property
    def min_value(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def max_value(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1


@dataclass(frozen=True)
class ComponentSplit:
    """The component widths of a ``bits``-bit operand, most significant first."""

    bits: int
    widths: tuple

    def __post_init__(self):
        check_bits(self.bits)
        widths = tuple(int(w) for w in self.widths)
        if not widths or any(w < 1 for w in widths) or sum(widths) != self.bits:
            raise ValueError(
                f"component_bits={self.widths!r} must be positive widths summing to bits={self.bits}"
            )
        object.__setattr__(self, "widths", widths)

    @property
    def n_resolutions(self) -> int:
        return len(self.widths)

    def shift(self, r: int) -> int:
        """Lowest bit position of component r (= the bits resolution r leaves out)."""
        return self.bits - sum(self.widths[: r + 1])

    def component(self, r: int) -> BitField:
        s = self.shift(r)
        return BitField(s, s + self.widths[r], self.bits)

    def truncated(self, r: int) -> BitField:
        """The operand truncated to its top r+1 components, in units of ``2**shift(r)``."""
        return BitField(self.shift(r), self.bits, self.bits)

    def max_dropped(self, r: int) -> int:
        """Largest value of ``q - truncated(q, r)``: every dropped bit set."""
        return (1 << self.shift(r)) - 1


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int,)) and not hasattr(bits, "__index__"):
        raise TypeError(f"bits must be an integer, not {type(bits).__name__}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} is out of range: allowed {MIN_BITS}..{MAX_BITS}")
    return bits


def default_component_bits(bits: int) -> tuple:
    """Default schedule: a 1-bit first resolution (cheap binary-plane product), then the rest.

    Measured on one AVX2 core (see README, Performance): the 1-bit x 1-bit first resolution
    runs through the popcount kernel at ~0.1x a float64 product, and the exact end through
    the int8 multiply-add kernel, whose cost depends little on digit width up to 7 bits.
    Wider operands get one more resolution per 7 bits, since each int8 digit product costs
    the same.
    """
    bits = check_bits(bits)
    rest = bits - 1
    widths = [1]
    while rest > 0:
        w = min(7, rest)
        widths.append(w)
        rest -= w
    return tuple(widths)


def make_split(bits: int, component_bits: Sequence[int] | int | None = None) -> ComponentSplit:
    """Build a split from ``component_bits``: a sequence of widths, one width for every component,
    or None for the default schedule."""
    bits = check_bits(bits)
    if component_bits is None:
        return ComponentSplit(bits, default_component_bits(bits))
    if isinstance(component_bits, (int,)) and not isinstance(component_bits, bool):
        w = int(component_bits)
        if w < 1:
            raise ValueError(f"component_bits={w} must be >= 1")
        widths = [w] * (bits // w) + ([bits % w] if bits % w else [])
        return ComponentSplit(bits, tuple(widths))
    return ComponentSplit(bits, tuple(component_bits))
