"""The safetensors dtype table: bit sizes and the serializer's sort order.

The order of :data:`DTYPE_ORDER` is the order of the format's ``Dtype`` enum; safetensors'
serializer sorts tensors by that rank, descending, then by name. Sub-byte dtypes (F4, F6_*) are
valid only when a tensor's elements fill whole bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Every dtype of the format, in the order of its enum (ascending).
DTYPE_ORDER: tuple[str, ...] = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)

_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

RANK: dict[str, int] = {name: rank for rank, name in enumerate(DTYPE_ORDER)}

#: Sizes above this cannot be represented by the format (offsets are u64).
MAX_U64 = 2**64 - 1


def is_dtype(name: object) -> bool:
    return isinstance(name, str) and name in _BITS


def bits(dtype: str) -> int:
    """Bits per element of ``dtype`` (KeyError for an unknown dtype)."""
    return _BITS[dtype]


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes taken by a tensor; ValueError when they are not whole bytes or overflow u64.

    Like safetensors, the element count is multiplied out left to right and every partial
    product must fit in 64 bits (so ``[2**40, 2**40, 2**40, 0]`` overflows although it is
    empty).
    """
    dims = list(shape)
    count = 1
    for dim in dims:
        count *= dim
        if count > MAX_U64:
            raise ValueError(f"size of shape {dims} overflows 64 bits (element count)")
    total_bits = count * _BITS[dtype]
    if total_bits > MAX_U64:
        raise ValueError(f"size of shape {dims} overflows 64 bits")
    if total_bits % 8:
        raise ValueError(f"{dtype} tensor of shape {dims} does not fill whole bytes")
    return total_bits // 8
