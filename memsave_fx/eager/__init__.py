"""Standalone rewrite for eager training, no torch.compile: `rewrite(gm)` and `convert(model)`.

The memory-saving autograd Functions live one family per module (`convolution`, `batch_norm`,
`activations`, `max_pool`, `dropout`); `replacements` says which calls they replace.
"""

from .convert import convert
from .rewrite import REWRITES, Replacement, rewrite

__all__ = ["REWRITES", "Replacement", "convert", "rewrite"]
