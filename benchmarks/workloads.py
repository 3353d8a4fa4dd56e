"""Fine-tuning workloads shared by the benchmarks and the real-model tests.

Each builder returns (model, example inputs, description). Models come from small
transformers configs: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Workload = Callable[[], tuple[nn.Module, list[torch.Tensor], str]]


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


def resnet_stem(batch: int = 8, image: int = 128):
    """Only the stem (conv + BN) trains; BatchNorm in eval mode throughout."""
    model = _resnet()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("embedder."))
    return PooledOutput(model), [torch.randn(batch, 3, image, image)], "ResNet, only the stem trainable, BN eval"


def resnet_bitfit(batch: int = 8, image: int = 128):
    """Only biases and normalisation parameters train (BitFit); BatchNorm in eval mode."""
    model = _resnet()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias") or ".normalization." in name)
    return PooledOutput(model), [torch.randn(batch, 3, image, image)], "ResNet, BitFit (biases + norms), BN eval"


def convnext_bitfit(batch: int = 8, image: int = 128):
    """ConvNeXt (depthwise 7x7 convs, LayerNorm, GELU): only biases train (BitFit)."""
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], num_channels=3)
    torch.manual_seed(0)
    model = ConvNextModel(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    return PooledOutput(model), [torch.randn(batch, 3, image, image)], "ConvNeXt, BitFit (biases only)"


def mobilenet_v2_bitfit(batch: int = 8, image: int = 128):
    """MobileNetV2 (depthwise convs, ReLU6, BatchNorm in eval mode): only biases train (BitFit),
    which here are the BatchNorm shifts."""
    from transformers import MobileNetV2Config, MobileNetV2Model

    config = MobileNetV2Config(num_channels=3, image_size=image, depth_multiplier=0.35)
    torch.manual_seed(0)
    model = MobileNetV2Model(config).eval()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))
    return PooledOutput(model), [torch.randn(batch, 3, image, image)], "MobileNetV2, BitFit (biases only), BN eval"


def vit_lora(batch: int = 8, image: int = 64):
    """A small ViT with peft LoRA (rank 8) on the attention queries and values."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        image_size=image, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(PooledOutput(ViTModel(config)), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    return model, [torch.randn(batch, 3, image, image)], "ViT, LoRA on queries and values"


WORKLOADS: dict[str, Workload] = {
    "resnet_stem": resnet_stem,
    "resnet_bitfit": resnet_bitfit,
    "convnext_bitfit": convnext_bitfit,
    "mobilenet_v2_bitfit": mobilenet_v2_bitfit,
    "vit_lora": vit_lora,
}
