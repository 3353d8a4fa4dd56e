"""Fine-tuning workloads shared by the benchmarks and the real-model tests.

Each builder takes `batch` and `size` (the image side, or the sequence length) and returns
(model, example inputs, description). Models come from small transformers configs: nothing
is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Workload = Callable[..., tuple[nn.Module, list[torch.Tensor], str]]


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic"
    )
    torch.manual_seed(0)
    return ResNetModel(config).eval()


class PooledOutput(nn.Module):
    """Calls a transformers vision model on pixel values and returns its pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


def resnet_stem(batch: int = 8, size: int = 128):
    """Only the stem (conv + BN) trains; BatchNorm in eval mode throughout."""
    model = _resnet()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("embedder."))
    return PooledOutput(model), [torch.randn(batch, 3, size, size)], "ResNet, only the stem trainable, BN eval"


def resnet_full(batch: int = 8, size: int = 128):
    """Full fine-tuning: every parameter trains; BatchNorm in eval mode."""
    model = _resnet()
    return PooledOutput(model), [torch.randn(batch, 3, size, size)], "ResNet, full fine-tuning, BN eval"


def resnet_bitfit(batch: int = 8, size: int = 128):
    """Only biases and normalisation parameters train (BitFit); BatchNorm in eval mode."""
    model = _resnet()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias") or ".normalization." in name)
    return PooledOutput(model), [torch.randn(batch, 3, size, size)], "ResNet, BitFit (biases + norms), BN eval"


def convnext_bitfit(batch: int = 8, size: int = 128):
    """ConvNeXt (depthwise 7x7 convs, LayerNorm, GELU): only biases train (BitFit)."""
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], num_channels=3)
    torch.manual_seed(0)
    model = ConvNextModel(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    return PooledOutput(model), [torch.randn(batch, 3, size, size)], "ConvNeXt, BitFit (biases only)"


def mobilenet_v2_bitfit(batch: int = 8, size: int = 128):
    """MobileNetV2 (depthwise convs, ReLU6, BatchNorm in eval mode): only biases train (BitFit),
    which here are the BatchNorm shifts."""
    from transformers import MobileNetV2Config, MobileNetV2Model

    config = MobileNetV2Config(num_channels=3, image_size=size, depth_multiplier=0.35)
    torch.manual_seed(0)
    model = MobileNetV2Model(config).eval()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    return PooledOutput(model), [torch.randn(batch, 3, size, size)], "MobileNetV2, BitFit (biases only), BN eval"


def vit_lora(batch: int = 8, size: int = 64):
    """A small ViT with peft LoRA (rank 8) on the attention queries and values."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        image_size=size, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(PooledOutput(ViTModel(config)), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return model, [torch.randn(batch, 3, size, size)], "ViT, LoRA on queries and values"


class LastHiddenState(nn.Module):
    """Calls a transformers language model on token ids and returns its last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def llama_lora(batch: int = 4, size: int = 64):
    """A small Llama (RMSNorm, SwiGLU, rotary attention) with peft LoRA (rank 8) on the
    attention queries and values, peft's default targets for Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=size,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(LastHiddenState(LlamaModel(config)), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    tokens = torch.randint(0, config.vocab_size, (batch, size), generator=torch.Generator().manual_seed(0))
    return model, [tokens], "Llama, LoRA on queries and values"


WORKLOADS: dict[str, Workload] = {
    "resnet_stem": resnet_stem,
    "resnet_full": resnet_full,
    "resnet_bitfit": resnet_bitfit,
    "convnext_bitfit": convnext_bitfit,
    "mobilenet_v2_bitfit": mobilenet_v2_bitfit,
    "vit_lora": vit_lora,
    "llama_lora": llama_lora,
}


def build(name: str, batch: int | None = None, size: int | None = None) -> tuple[nn.Module, list[torch.Tensor], str]:
    """Workload `name`, at its own batch and size where these are None."""
    given = {"batch": batch, "size": size}
    return WORKLOADS[name](**{k: v for k, v in given.items() if v is not None})


# Full-size workloads for the GPU benchmark (benchmarks/gpu.py). They are not in WORKLOADS:
# at their default sizes they are too large for the CPU benchmarks and tests that run all of
# WORKLOADS. Keyword arguments shrink them for a smoke run.


def _bottleneck_resnet(depths: tuple[int, ...], hidden_sizes: tuple[int, ...], embedding_size: int) -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
        layer_type="bottleneck",
    )  # fmt: skip
    torch.manual_seed(0)
    return ResNetModel(config).eval()


def _resnet_name(depths: tuple[int, ...]) -> str:
    # Three convolutions per bottleneck block, plus the stem and the classifier that the name counts.
    return f"ResNet-{3 * sum(depths) + 2} (bottleneck, depths {list(depths)})"


def bottleneck_resnet_input_grad(
    batch: int = 64,
    size: int = 224,
    *,
    depths: tuple[int, ...] = (3, 4, 23, 3),
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048),
    embedding_size: int = 64,
):
    """The memsave paper's headline case, ResNet-101 by default: no parameter trains, only the
    input requires grad; BatchNorm in eval mode."""
    model = _bottleneck_resnet(depths, hidden_sizes, embedding_size)
    model.requires_grad_(False)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_()
    return PooledOutput(model), [pixels], f"{_resnet_name(depths)}, no parameter trains, the input requires grad, BN eval"


def bottleneck_resnet_stem(
    batch: int = 64,
    size: int = 224,
    *,
    depths: tuple[int, ...] = (3, 4, 6, 3),
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048),
    embedding_size: int = 64,
):
    """ResNet-50 by default: only the stem (conv + BN) trains; BatchNorm in eval mode."""
    model = _bottleneck_resnet(depths, hidden_sizes, embedding_size)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("embedder."))
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return PooledOutput(model), [pixels], f"{_resnet_name(depths)}, only the stem (conv + BN) trains, BN eval"


class CausalLMLoss(nn.Module):
    """Calls a causal language model with labels and returns its loss.

    With `logits_returned`, the loss is taken from the model's output outside the compiled
    graph, as HF Trainer does: the graph then returns the logits too, and autograd passes them
    a zero tangent in the backward.
    """

    def __init__(self, model: nn.Module, *, logits_returned: bool = False) -> None:
        super().__init__()
        self.model = model
        self.logits_returned = logits_returned

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, labels=labels)
        return _loss_outside_the_graph(output) if self.logits_returned else output.loss


@torch.compiler.disable
def _loss_outside_the_graph(output: Any) -> torch.Tensor:
    return output.loss


def llama_lora_causal_lm(
    batch: int = 4,
    size: int = 512,
    *,
    hidden_size: int = 1024,
    intermediate_size: int = 2816,
    layers: int = 4,
    heads: int = 16,
    kv_heads: int = 8,
    vocab_size: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
):
    """A Llama causal LM (RMSNorm, SwiGLU, rotary attention, grouped-query attention) with its
    weights in `dtype` and peft LoRA on every linear layer but the head; the model returns the
    language-modelling loss. peft's defaults (rank 8, fp32 adapters) except lora_dropout=0.05,
    the usual recipe (peft's default is 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
        max_position_embeddings=max(size, 2048), use_cache=False,  # training: no key/value cache
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", lora_dropout=0.05)
    model = get_peft_model(model, lora)
    tokens = torch.randint(0, vocab_size, (batch, size), generator=torch.Generator().manual_seed(0))
    description = (
        f"Llama, {layers} layers, hidden {hidden_size}, vocab {vocab_size}, {str(dtype).removeprefix('torch.')} "
        "weights, peft LoRA (r=8, dropout 0.05) on every linear layer, causal-LM loss"
    )
    return CausalLMLoss(model), [tokens, tokens.clone()], description
