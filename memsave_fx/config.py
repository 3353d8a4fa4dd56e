"""The memsave option keys, validated once at construction.

Each option can also be set in the environment as `MEMSAVE_<OPTION>` (`MEMSAVE_SHARE_NORMS=1`),
for frameworks that pass torch.compile only a backend name, as Inductor reads `TORCHINDUCTOR_*`.
An option given explicitly wins over its variable.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Collection, Mapping
from typing import Any, Literal

COMPILERS = ("inductor", "eager")
ENVIRONMENT_PREFIX = "MEMSAVE_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class MemsaveConfig:
    """Options consumed by the memsave backend; every other option goes to Inductor.

    compiler: "inductor" generates code; "eager" runs AOTAutograd with the same
        passes and no code generation (for debugging).
    exact_compression: 1-bit masks, narrow indices, no saved copies of frozen weights.
    approx_activations: ReGELU2 / ReSiLU2 (lossy backward, exact forward).
    share_norms: MS-LayerNorm / MS-RMSNorm memory sharing (exact up to rounding).
    pool_activations: k > 1 keeps k-pooled conv inputs for weight gradients (lossy); 1 is off.
    chunked_loss: the LM head's cross-entropy in row chunks, its gradients formed in the
        forward, so that no logits are kept for backward (exact up to reduction order).
    """

    compiler: Literal["inductor", "eager"] = "inductor"
    exact_compression: bool = True
    approx_activations: bool = False
    share_norms: bool = False
    pool_activations: int = 1
    chunked_loss: bool = True
    # Which options came from MEMSAVE_<OPTION> variables: shown by the plan, and no part of
    # the options' identity (equality, hashing, the compile caches' keys).
    from_environment: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False, metadata={"option": False})

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> MemsaveConfig:
        """The given options, then the `MEMSAVE_<OPTION>` variables of `environ` (the process
        environment by default) for the options not given, then the defaults."""
        options = dict(options or {})
        if unknown := sorted(set(options) - cls.option_names()):
            raise ValueError(
                f"unknown memsave option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(cls.option_names()))}"
            )
        from_environment = environment_options(os.environ if environ is None else environ, skip=options.keys())
        return cls(**options, **from_environment, from_environment=tuple(sorted(from_environment)))

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"memsave option compiler={self.compiler!r} is invalid; valid values: "
                + ", ".join(repr(c) for c in COMPILERS)
            )
        for name in ("exact_compression", "approx_activations", "share_norms", "chunked_loss"):
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
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("option", True))

    @classmethod
    def split_options(cls, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split torch.compile options into memsave's and the rest (for Inductor)."""
        names = cls.option_names()
        options = options or {}
        ours = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names}
        return ours, rest


def environment_variable(option: str) -> str:
    return ENVIRONMENT_PREFIX + option.upper()


def environment_options(environ: Mapping[str, str], skip: Collection[str] = ()) -> dict[str, Any]:
    """The memsave options set by `MEMSAVE_<OPTION>` variables in `environ`, parsed; options in
    `skip` (given explicitly) and variables set to "" are left out.

    A bad value raises a ValueError naming the variable and its valid values; so does a
    variable that is a misspelling of an option's (other MEMSAVE_ names are not memsave's options).
    """
    fields = {f.name: f for f in dataclasses.fields(MemsaveConfig) if f.metadata.get("option", True)}
    variables = {environment_variable(name): name for name in fields}
    options: dict[str, Any] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENVIRONMENT_PREFIX):
            continue
        if variable not in variables:
            close = difflib.get_close_matches(variable, variables, n=1, cutoff=0.8)
            if close:
                raise ValueError(
                    f"environment variable {variable} is not a memsave option; did you mean {close[0]}? "
                    f"valid: {', '.join(sorted(variables))}"
                )
            continue
        name = variables[variable]
        if name not in skip and text.strip():
            options[name] = _parse(variable, text, fields[name].default)
    return options


def _parse(variable: str, text: str, default: Any) -> Any:
    value = text.strip().lower()
    if isinstance(default, bool):
        if value in _TRUE + _FALSE:
            return value in _TRUE
        valid = ", ".join(_TRUE + _FALSE)
    elif isinstance(default, int):
        if value.isascii() and value.isdigit() and int(value) >= 1:
            return int(value)
        valid = "an int >= 1"
    else:
        if value in COMPILERS:
            return value
        valid = ", ".join(COMPILERS)
    raise ValueError(f"environment variable {variable}={text!r} is invalid; valid values: {valid}")
