"""The counter-based generator's constants and its 64-bit hash: what every path that draws z (torch ops,
the fused CPU kernel, the fused device kernels) must agree on, kept in one place."""

from __future__ import annotations

BLOCK = 1024  # elements: z is generated in whole, aligned blocks (Box-Muller halves, Rademacher words)
MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # the Weyl sequence's step
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser
SEED_SALT = 0x5851F42D4C957F2D


def to_i64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``x`` (torch has no uint64 arithmetic)."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def mix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference the tensor code is tested against)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * M1) & MASK64
    x = ((x ^ (x >> 27)) * M2) & MASK64
    return x ^ (x >> 31)


def direction_key(seed: int) -> int:
    """The 64-bit key of direction ``seed``: every bit of the seed matters (no 32-bit truncation)."""
    return mix64(seed ^ SEED_SALT)
