import re

__version__ = "0.1.0"

# The torch minor versions memsave_fx is tested with, oldest and newest: its passes rely on
# AOTAutograd's and Inductor's internals (see the design notes), which change between minors.
SUPPORTED_TORCH = ((2, 11), (2, 13))


def require_supported_torch(version: str) -> None:
    """Raise ImportError unless `version` (torch.__version__) is a supported minor version."""
    match = re.match(r"(\d+)\.(\d+)", version)
    oldest, newest = SUPPORTED_TORCH
    if match is None or not oldest <= (int(match[1]), int(match[2])) <= newest:
        supported = f"{oldest[0]}.{oldest[1]} to {newest[0]}.{newest[1]}"
        raise ImportError(
            f"memsave_fx {__version__} supports torch {supported}; found torch {version}. "
            f"Install a supported version, for example: pip install torch=={newest[0]}.{newest[1]}.0"
        )
