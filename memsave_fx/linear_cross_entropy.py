"""The kernels the loss-head rewrite calls (`memsave_fx.passes.chunk_linear_cross_entropy`).

`memsave::linear_cross_entropy` computes `cross_entropy(hidden @ weight.T + bias, target)` a
block of rows at a time, and with it the loss's gradients with respect to `hidden`, `weight`
and `bias`, for a unit tangent: the loss is a scalar, so d loss / d logits is
(softmax(logits) - onehot(target)) / count, known in the forward. The backward only scales
them by the loss's tangent. No block holds more than `rows_per_chunk` rows of logits, so
nothing vocabulary-wide is kept, and the forward does no more matmuls than stock compilation's
forward and backward together.

Each step follows the dtypes of the graph it replaces: logits in the linear's dtype, the
log-softmax in `dtype` (fp32 when the model upcasts), the gradient cast back to the linear's
dtype before its matmuls. The results equal stock Inductor's up to reduction order.
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, d loss/d hidden, d loss/d weight, d loss/d bias, logits) for `hidden` [N, d],
    `weight` [V, d], `target` [N]. `gradients` says which of the three gradients to form
    (the others, and the logits unless `return_logits`, are empty); `mean` divides by the
    number of rows whose target is not `ignore_index`, as `reduction="mean"` does."""
    need_hidden, need_weight, need_bias = gradients
    rows, vocabulary = hidden.shape[0], weight.shape[0]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    # The per-row factor of the gradient: 1/count (mean) or 1, and 0 for ignored rows.
    count = valid.sum().to(dtype)
    scale = 1 / count if mean else torch.ones((), dtype=dtype, device=hidden.device)
    row_scale = torch.where(valid, scale, torch.zeros((), dtype=dtype, device=hidden.device)).unsqueeze(1)

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logits = hidden.new_empty((rows, vocabulary) if return_logits else (0,), dtype=torch.result_type(hidden, weight))
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    accumulate = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros(vocabulary, dtype=accumulate, device=weight.device) if need_bias and bias is not None else weight.new_empty(0)

    for start in range(0, rows, rows_per_chunk):
        end = min(start + rows_per_chunk, rows)
        block = hidden[start:end]
        block_logits = F.linear(block, weight, bias)
        if return_logits:
            logits[start:end] = block_logits
        # x - max - log(sum(exp(x - max))), as the decomposition computes it, in one kernel.
        log_probs = torch.log_softmax(block_logits, 1, dtype=dtype)
        picked = log_probs.gather(1, safe_target[start:end]).squeeze(1)
        total -= torch.where(valid[start:end], picked, 0).sum(dtype=torch.float32)
        grad = log_probs.exp_()  # softmax, in place of the log-probabilities
        grad.scatter_add_(1, safe_target[start:end], grad.new_full((end - start, 1), -1))
        grad = grad.mul_(row_scale[start:end]).to(block_logits.dtype)
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if need_weight:
            grad_weight += torch.mm(grad.t(), block)
        if need_bias and bias is not None:
            grad_bias += grad.sum(0, dtype=accumulate)

    loss = total.to(dtype) / count if mean else total.to(dtype)
    return loss, grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), logits


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, target, ignore_index, mean, dtype, rows_per_chunk, gradients, return_logits):
    need_hidden, need_weight, need_bias = gradients
    rows, vocabulary = hidden.shape[0], weight.shape[0]
    return (
        hidden.new_empty((), dtype=dtype),
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        weight.new_empty(vocabulary) if need_bias and bias is not None else weight.new_empty(0),
        hidden.new_empty((rows, vocabulary) if return_logits else (0,), dtype=torch.result_type(hidden, weight)),
    )


@torch.library.custom_op("memsave::linear_backward_unless_zero", mutates_args=())
def linear_backward_unless_zero(
    grad_output: Tensor, hidden: Tensor, weight: Tensor, gradients: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """A linear layer's (grad_hidden, grad_weight, grad_bias) for `grad_output` [N, V], with no
    matmul when it is all zeros: autograd passes zeros for outputs nobody differentiated, and
    the logits' tangent is one, as large as the logits, whenever only the loss is."""
    need_hidden, need_weight, need_bias = gradients
    if not bool(grad_output.any()):
        return (
            hidden.new_zeros(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_zeros(weight.shape) if need_weight else weight.new_empty(0),
            weight.new_zeros(weight.shape[0]) if need_bias else weight.new_empty(0),
        )
    return (
        torch.mm(grad_output, weight) if need_hidden else hidden.new_empty(0),
        torch.mm(grad_output.t(), hidden) if need_weight else weight.new_empty(0),
        grad_output.sum(0).to(weight.dtype) if need_bias else weight.new_empty(0),
    )


@linear_backward_unless_zero.register_fake
def _(grad_output, hidden, weight, gradients):
    need_hidden, need_weight, need_bias = gradients
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_bias else weight.new_empty(0),
    )
