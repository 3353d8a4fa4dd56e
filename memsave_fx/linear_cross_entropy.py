"""The loss head's computation (`memsave_fx.passes.chunk_linear_cross_entropy`).

`linear_cross_entropy` computes `cross_entropy(hidden @ weight.T + bias, target)` a block of
rows at a time, and with it the loss's gradients with respect to `hidden`, `weight` and
`bias`, for a unit tangent: the loss is a scalar, so d loss / d logits is
(softmax(logits) - onehot(target)) / count, known in the forward. The backward only scales
them by the loss's tangent. The pass traces it into the joint graph: nothing vocabulary-wide
is kept for backward, and there are no more matmuls than stock compilation's forward and
backward together.

A LoRA'd head (peft's `lm_head` with an adapter) adds its low-rank term to the logits; its
gradients with respect to lora_A's output and lora_B's weight are formed the same way.

Each step follows the dtypes of the graph it replaces: logits in the linear's dtype (the LoRA
term in its own, their sum in the promoted dtype, cast back as peft does), the log-softmax in
`dtype` (fp32 when the model upcasts), the gradient cast back step by step before its
matmuls. The results equal stock Inductor's up to reduction order.

`memsave::linear_backward_unless_zero`, an opaque op, is the backward for a tangent of the
returned logits: it skips its matmuls when the tangent is all zeros.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_backward_unless_zero", "linear_cross_entropy"]


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    mean: bool,
    dtype: torch.dtype,
    chunks: int,
    gradients: list[bool],
    return_logits: bool,
    low_rank: Tensor | None = None,
    low_rank_weight: Tensor | None = None,
    low_rank_scale: float = 1.0,
    logits_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, ...]:
    """(loss, d loss/d hidden, weight, bias, low_rank, low_rank_weight, then the logits) for
    `hidden` [N, d], `weight` [V, d], `target` [N], and optionally a LoRA term: `low_rank`
    [N, r] (lora_A's output) times `low_rank_weight` [V, r] (lora_B's weight) times
    `low_rank_scale`, added to the linear's output and the sum cast to `logits_dtype`, as peft
    does. `gradients` says which of the five gradients to form (the others are None, and so
    are the logits unless `return_logits`); `mean` divides by the number of rows whose target
    is not `ignore_index`, as `reduction="mean"` does. The rows go in `chunks` blocks.

    Out-of-place ops only: the pass traces this into the joint graph, where Inductor fuses each
    block's log-softmax, loss and gradient into kernels that read the block's logits and write
    its gradient in the logits' dtype, with no fp32 block in memory."""
    head = _Head(hidden, weight, bias, low_rank, low_rank_weight, low_rank_scale, logits_dtype, gradients)
    rows = hidden.shape[0]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    # The per-row factor of the gradient: 1/count (mean) or 1, and 0 for ignored rows.
    count = valid.sum().to(dtype)
    row_scale = torch.where(valid, 1 / count if mean else 1.0, 0.0).to(dtype).unsqueeze(1)
    vocabulary = torch.arange(weight.shape[0], device=hidden.device)

    # Returned logits are computed whole, as the graph returns them; the blocks are their rows.
    logits = head.logits(slice(None)) if return_logits else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    blocks = []
    bounds = [rows * i // chunks for i in range(chunks + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        rows_in_block = slice(start, stop)
        block_logits = head.logits(rows_in_block) if logits is None else logits[rows_in_block]
        # x - max - log(sum(exp(x - max))) once decomposed, as stock compilation computes it.
        log_probs = torch.log_softmax(block_logits, 1, dtype=dtype)
        block_target = safe_target[rows_in_block]
        picked = log_probs.gather(1, block_target).squeeze(1)
        total = total - torch.where(valid[rows_in_block], picked, 0).sum(dtype=torch.float32)
        grad = (log_probs.exp() - (vocabulary == block_target).to(dtype)) * row_scale[rows_in_block]
        blocks.append(head.backward(grad.to(head.logits_dtype), rows_in_block))

    loss = total.to(dtype) / count if mean else total.to(dtype)
    return loss, *head.finish(blocks), logits


@torch.library.custom_op("memsave::linear_backward_unless_zero", mutates_args=())
def linear_backward_unless_zero(
    grad_output: Tensor,
    hidden: Tensor,
    weight: Tensor,
    gradients: list[bool],
    low_rank: Tensor | None = None,
    low_rank_weight: Tensor | None = None,
    low_rank_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The head's gradients with respect to hidden, weight, bias, low_rank and low_rank_weight
    (as `linear_cross_entropy` names them) for the logits' gradient `grad_output` [N, V], with
    no matmul when it is all zeros: autograd passes zeros for outputs nobody differentiated, and
    the logits' tangent is one, as large as the logits, whenever only the loss is."""
    head = _Head(hidden, weight, None, low_rank, low_rank_weight, low_rank_scale, grad_output.dtype, gradients)
    if _all_zero_bits(grad_output):
        return head.zeros()
    # A custom op returns tensors: empty ones for the gradients not requested.
    return tuple(hidden.new_empty(0) if g is None else g for g in head.finish([head.backward(grad_output, slice(None))]))


@linear_backward_unless_zero.register_fake
def _(grad_output, hidden, weight, gradients, low_rank=None, low_rank_weight=None, low_rank_scale=1.0):
    head = _Head(hidden, weight, None, low_rank, low_rank_weight, low_rank_scale, grad_output.dtype, gradients)
    return head.zeros()


class _Head:
    """The logits `(hidden @ weight.T + bias [+ (low_rank @ low_rank_weight.T) * scale]).to(logits_dtype)`
    a block of rows at a time, and their backward, each step in the dtype the graph uses: the
    linear in its inputs' dtype, the LoRA term in its own, their sum in the promoted dtype."""

    def __init__(self, hidden, weight, bias, low_rank, low_rank_weight, low_rank_scale, logits_dtype, gradients):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.low_rank, self.low_rank_weight, self.low_rank_scale = low_rank, low_rank_weight, low_rank_scale
        self.linear_dtype = torch.result_type(hidden, weight)
        self.sum_dtype = self.linear_dtype if low_rank is None else torch.promote_types(self.linear_dtype, torch.result_type(low_rank, low_rank_weight))
        self.logits_dtype = logits_dtype or self.sum_dtype
        self.need = dict(zip(_GRADIENTS, gradients, strict=True))
        if low_rank is None and (self.need["low_rank"] or self.need["low_rank_weight"]):
            raise ValueError("the LoRA term's gradients were requested without a LoRA term")

    def logits(self, rows: slice) -> Tensor:
        logits = F.linear(self.hidden[rows], self.weight, self.bias)
        if self.low_rank is not None:
            logits = logits + F.linear(self.low_rank[rows], self.low_rank_weight) * self.low_rank_scale
        return logits.to(self.logits_dtype)

    def backward(self, grad: Tensor, rows: slice) -> dict[str, Tensor]:
        """The requested gradients' terms for the logits' gradient `grad` over `rows`: the
        row-wise gradients' rows, the parameters' summands."""
        grad = grad.to(self.sum_dtype)
        linear_grad = grad.to(self.linear_dtype)
        terms = {}
        if self.need["hidden"]:
            terms["hidden"] = torch.mm(linear_grad, self.weight)
        if self.need["weight"]:
            terms["weight"] = torch.mm(linear_grad.t(), self.hidden[rows])
        if self.need["bias"]:
            terms["bias"] = linear_grad.sum(0, dtype=_accumulation_dtype(self.weight.dtype))
        if self.low_rank is not None:
            term_grad = grad.to(self.low_rank.dtype) * self.low_rank_scale
            if self.need["low_rank"]:
                terms["low_rank"] = torch.mm(term_grad, self.low_rank_weight)
            if self.need["low_rank_weight"]:
                terms["low_rank_weight"] = torch.mm(term_grad.t(), self.low_rank[rows])
        return terms

    def finish(self, blocks: list[dict[str, Tensor]]) -> tuple[Tensor | None, ...]:
        """The gradients in _GRADIENTS' order from the blocks' terms, each in its tensor's dtype
        (None if not requested): row-wise ones joined, the parameters' summed, in fp32 for
        half-precision parameters."""
        grads = []
        for name in _GRADIENTS:
            if not self.need[name]:
                grads.append(None)
            elif name in _ROW_WISE:
                grads.append(blocks[0][name] if len(blocks) == 1 else torch.cat([b[name] for b in blocks]))
            elif len(blocks) == 1:
                grads.append(blocks[0][name].to(self._dtype(name)))
            else:
                summands = [b[name].to(_accumulation_dtype(b[name].dtype)) for b in blocks]
                grads.append(functools.reduce(torch.add, summands).to(self._dtype(name)))
        return tuple(grads)

    def zeros(self) -> tuple[Tensor, ...]:
        """Zero gradients where requested, empty tensors elsewhere."""
        return tuple(torch.zeros_like(self._like(name)) if self.need[name] else self.hidden.new_empty(0) for name in _GRADIENTS)

    def _like(self, name: str) -> Tensor:
        """A tensor shaped and typed as the gradient `name`."""
        return {"hidden": self.hidden, "weight": self.weight, "bias": self.weight[:, 0],
                "low_rank": self.low_rank, "low_rank_weight": self.low_rank_weight}[name]  # fmt: skip

    def _dtype(self, name: str) -> torch.dtype:
        return self._like(name).dtype


def _all_zero_bits(tensor: Tensor) -> bool:
    """Whether every element is +0: the bits read as integers, whose min and max take one pass
    (about a tenth of `.any()`'s time on a CPU, which converts to bool first). A -0 counts as
    nonzero, which costs only the matmuls it would have skipped."""
    if tensor.numel() == 0:
        return True
    bits = tensor.view(_SAME_SIZE_INTEGER[tensor.dtype.itemsize])
    low, high = torch.aminmax(bits)
    return bool(low == 0) and bool(high == 0)


_SAME_SIZE_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_GRADIENTS = ("hidden", "weight", "bias", "low_rank", "low_rank_weight")
_ROW_WISE = ("hidden", "low_rank")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
