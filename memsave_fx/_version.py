import re
import warnings

__version__ = "0.1.0"

# The oldest torch minor version memsave_fx runs on, and the newest its test suite has run on.
# Its passes rely on AOTAutograd's and Inductor's internals, which `memsave_fx._compat` names
# one by one: a newer torch imports with a warning, and a missing internal raises an error
# naming itself, instead of every newer torch being refused.
OLDEST_TORCH = (2, 11)
NEWEST_TESTED_TORCH = (2, 14)


class UntestedTorchWarning(UserWarning):
    """The installed torch is newer than any memsave_fx was tested with."""


def check_torch_version(version: str) -> None:
    """Raise ImportError for a torch older than OLDEST_TORCH; warn once for one newer than
    NEWEST_TESTED_TORCH. `version` is torch.__version__."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"memsave_fx {__version__} cannot read the torch version {version!r}")
    found = (int(match[1]), int(match[2]))
    tested = f"{_minor(OLDEST_TORCH)} to {_minor(NEWEST_TESTED_TORCH)}"
    if found < OLDEST_TORCH:
        raise ImportError(
            f"memsave_fx {__version__} needs torch >= {_minor(OLDEST_TORCH)}; found torch {version}. "
            f"It is tested on torch {tested}: pip install 'torch>={_minor(OLDEST_TORCH)}'"
        )
    if found > NEWEST_TESTED_TORCH:
        warnings.warn(
            f"memsave_fx {__version__} is tested on torch {tested}; found torch {version}. "
            "It checks the torch internals it uses and raises an error naming any that changed; "
            "`memsave-fx selftest` checks gradients and saved bytes on this installation.",
            UntestedTorchWarning,
            stacklevel=3,
        )


def _minor(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"
