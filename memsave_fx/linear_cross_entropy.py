"""The kernels the loss-head rewrite calls (`memsave_fx.passes.chunk_linear_cross_entropy`).

`memsave::linear_cross_entropy` computes `cross_entropy(hidden @ weight.T + bias, target)` a
block of rows at a time, and with it the loss's gradients with respect to `hidden`, `weight`
and `bias`, for a unit tangent: the loss is a scalar, so d loss / d logits is
(softmax(logits) - onehot(target)) / count, known in the forward. The backward only scales
them by the loss's tangent. No block holds more than `rows_per_chunk` rows of logits, so
nothing vocabulary-wide is kept, and the forward does no more matmuls than stock compilation's
forward and backward together.

A LoRA'd head (peft's `lm_head` with an adapter) adds its low-rank term to the logits; its
gradients with respect to lora_A's output and lora_B's weight are formed the same way.

Each step follows the dtypes of the graph it replaces: logits in the linear's dtype (the LoRA
term in its own, their sum in the promoted dtype, cast back as peft does), the log-softmax in
`dtype` (fp32 when the model upcasts), the gradient cast back step by step before its
matmuls. The results equal stock Inductor's up to reduction order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_backward_unless_zero", "linear_cross_entropy"]


@torch.library.custom_op("memsave::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    mean: bool,
    dtype: torch.dtype,
    rows_per_chunk: int,
    gradients: list[bool],
    return_logits: bool,
    low_rank: Tensor | None = None,
    low_rank_weight: Tensor | None = None,
    low_rank_scale: float = 1.0,
    logits_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, and d loss/d hidden, weight, bias, low_rank, low_rank_weight, then the logits) for
    `hidden` [N, d], `weight` [V, d], `target` [N], and optionally a LoRA term: `low_rank`
    [N, r] (lora_A's output) times `low_rank_weight` [V, r] (lora_B's weight) times
    `low_rank_scale`, added to the linear's output and the sum cast to `logits_dtype`, as peft
    does. `gradients` says which of the five gradients to form (the others, and the logits
    unless `return_logits`, are empty); `mean` divides by the number of rows whose target is not
    `ignore_index`, as `reduction="mean"` does."""
    head = _Head(hidden, weight, bias, low_rank, low_rank_weight, low_rank_scale, logits_dtype, gradients)
    rows = hidden.shape[0]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    # The per-row factor of the gradient: 1/count (mean) or 1, and 0 for ignored rows.
    count = valid.sum().to(dtype)
    scale = 1 / count if mean else torch.ones((), dtype=dtype, device=hidden.device)
    row_scale = torch.where(valid, scale, torch.zeros((), dtype=dtype, device=hidden.device)).unsqueeze(1)

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logits = hidden.new_empty((rows, weight.shape[0]) if return_logits else (0,), dtype=head.logits_dtype)
    grads = head.empty_gradients()
    for start in range(0, rows, rows_per_chunk):
        rows_in_block = slice(start, min(start + rows_per_chunk, rows))
        block_logits = head.logits(rows_in_block)
        if return_logits:
            logits[rows_in_block] = block_logits
        # x - max - log(sum(exp(x - max))), as the decomposition computes it, in one kernel.
        log_probs = torch.log_softmax(block_logits, 1, dtype=dtype)
        picked = log_probs.gather(1, safe_target[rows_in_block]).squeeze(1)
        total -= torch.where(valid[rows_in_block], picked, 0).sum(dtype=torch.float32)
        grad = log_probs.exp_()  # softmax, in place of the log-probabilities
        grad.scatter_add_(1, safe_target[rows_in_block], grad.new_full((grad.shape[0], 1), -1))
        head.backward(grad.mul_(row_scale[rows_in_block]).to(head.logits_dtype), rows_in_block, grads)

    loss = total.to(dtype) / count if mean else total.to(dtype)
    return loss, *head.finish(grads), logits


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, mean, dtype, rows_per_chunk, gradients, return_logits,
      low_rank=None, low_rank_weight=None, low_rank_scale=1.0, logits_dtype=None):  # fmt: skip
    head = _Head(hidden, weight, bias, low_rank, low_rank_weight, low_rank_scale, logits_dtype, gradients)
    logits = hidden.new_empty((hidden.shape[0], weight.shape[0]) if return_logits else (0,), dtype=head.logits_dtype)
    return hidden.new_empty((), dtype=dtype), *head.finish(head.empty_gradients()), logits


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
    nonzero = bool(grad_output.any())
    grads = head.empty_gradients(zeroed=not nonzero)
    if nonzero:
        head.backward(grad_output, slice(None), grads)
    return head.finish(grads)


@linear_backward_unless_zero.register_fake
def _(grad_output, hidden, weight, gradients, low_rank=None, low_rank_weight=None, low_rank_scale=1.0):
    head = _Head(hidden, weight, None, low_rank, low_rank_weight, low_rank_scale, grad_output.dtype, gradients)
    return head.finish(head.empty_gradients())


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

    def backward(self, grad: Tensor, rows: slice, grads: dict[str, Tensor]) -> None:
        """Adds the gradients for the logits' gradient `grad` over `rows` into `grads`."""
        grad = grad.to(self.sum_dtype)
        linear_grad = grad.to(self.linear_dtype)
        if self.need["hidden"]:
            grads["hidden"][rows] = torch.mm(linear_grad, self.weight)
        if self.need["weight"]:
            grads["weight"] += torch.mm(linear_grad.t(), self.hidden[rows])
        if self.need["bias"]:
            grads["bias"] += linear_grad.sum(0, dtype=grads["bias"].dtype)
        if self.low_rank is not None:
            term_grad = grad.to(self.low_rank.dtype) * self.low_rank_scale
            if self.need["low_rank"]:
                grads["low_rank"][rows] = torch.mm(term_grad, self.low_rank_weight)
            if self.need["low_rank_weight"]:
                grads["low_rank_weight"] += torch.mm(term_grad.t(), self.low_rank[rows])

    def empty_gradients(self, zeroed: bool = False) -> dict[str, Tensor]:
        """Row-wise gradients to fill block by block (zeros if `zeroed`); the parameters' to
        accumulate into, in fp32 for half-precision parameters."""
        vocabulary = self.weight.shape[0]
        grads = {}
        for name, like, accumulated in (
            ("hidden", self.hidden, False),
            ("weight", self.weight, True),
            ("bias", self.weight.new_empty(vocabulary), True),
            ("low_rank", self.low_rank, False),
            ("low_rank_weight", self.low_rank_weight, True),
        ):  # fmt: skip
            if not self.need[name]:
                grads[name] = self.weight.new_empty(0)
            elif accumulated or zeroed:
                grads[name] = torch.zeros(like.shape, dtype=_accumulation_dtype(like.dtype), device=like.device)
            else:
                grads[name] = torch.empty_like(like)
        return grads

    def finish(self, grads: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The gradients in _GRADIENTS' order, each in its tensor's dtype."""
        dtypes = {"hidden": self.hidden.dtype, "weight": self.weight.dtype, "bias": self.weight.dtype}
        if self.low_rank is not None:
            dtypes |= {"low_rank": self.low_rank.dtype, "low_rank_weight": self.low_rank_weight.dtype}
        return tuple(grads[name].to(dtypes.get(name, grads[name].dtype)) for name in _GRADIENTS)


_GRADIENTS = ("hidden", "weight", "bias", "low_rank", "low_rank_weight")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
