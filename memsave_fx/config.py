"""The memsave option keys, validated once at construction."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

COMPILERS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class MemsaveConfig:
    """Options consumed by the memsave backend; every other option goes to Inductor.

    compiler: "inductor" generates code; "eager" runs AOTAutograd with the same
        passes and no code generation (for debugging).
    exact_compression: 1-bit masks, narrow indices, no saved copies of frozen weights.
    approx_activations: ReGELU2 / ReSiLU2 (lossy backward, exact forward).
    share_norms: MS-LayerNorm / MS-RMSNorm memory sharing (exact up to rounding).
    pool_activations: k > 1 keeps k-pooled conv inputs for weight gradients (lossy); 1 is off.
    """

    compiler: Literal["inductor", "eager"] = "inductor"
    exact_compression: bool = True
    approx_activations: bool = False
    share_norms: bool = False
    pool_activations: int = 1

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"memsave option compiler={self.compiler!r} is invalid; valid values: "
                + ", ".join(repr(c) for c in COMPILERS)
            )
        for name in ("exact_compression", "approx_activations", "share_norms"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"memsave option {name}={value!r} is invalid; valid values: True, False"
                )
        k = self.pool_activations
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"memsave option pool_activations={k!r} is invalid; "
                "valid values: an int >= 1 (1 turns pooling off)"
            )

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def split_options(cls, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split torch.compile options into memsave's and the rest (for Inductor)."""
        names = cls.option_names()
        options = options or {}
        ours = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names}
        return ours, rest
