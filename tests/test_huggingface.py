"""memsave under Hugging Face's trainers: Trainer and TRL's SFTTrainer (through MemsaveCallback),
and accelerate (compile in place, then prepare). Tiny models, a few steps on synthetic data.

Each run checks that memsave compiled the model (its record shows what it did), that the
trained weights changed, and that the checkpoint holds every trained tensor under its usual
name and loads back equal to the trained weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from memsave_fx.huggingface import MemsaveCallback

pytestmark = pytest.mark.slow

VOCAB = 64


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, use_cache=False, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)  # bf16 weights, as fine-tuned


def lora_config():
    from peft import LoraConfig

    return LoraConfig(target_modules="all-linear", lora_dropout=0.05)  # peft's defaults otherwise: fp32 adapters


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_trained(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = trainable(model)
    assert after.keys() == before.keys() and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged


def assert_adapter_saved(model, directory) -> None:
    """The adapter file holds every trained tensor under peft's own names, and loads back equal."""
    from peft import PeftModel, get_peft_model_state_dict

    saved = load_file(directory / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model)
    assert len(saved) == len(trainable(model)) and saved.keys() == expected.keys()
    assert not any("_orig_mod" in name for name in saved)
    loaded = PeftModel.from_pretrained(tiny_llama(), directory)
    reloaded = dict(loaded.named_parameters())
    for name, value in trainable(model).items():
        assert torch.equal(reloaded[name].detach().to(value.dtype), value), name


def assert_memsave_compiled(callback: MemsaveCallback) -> None:
    graphs = [graph for graph in callback.compiler.compiled if graph.has_backward]
    assert graphs, "memsave compiled no training graph"
    # peft's LoRA dropout: its masks are saved packed at 1 bit, the one exact saving here today.
    assert sum(graph.packed_masks for graph in graphs) > 0


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), lora_config())
    before = trainable(model)
    tokens = torch.randint(3, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    callback = MemsaveCallback()
    out = tmp_path_factory.mktemp("trainer")
    args = TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "adapter"))
    return model, before, callback, metrics, out / "adapter", caught


def test_trainer_compiles_with_memsave(trainer_run):
    _, _, callback, _, _, caught = trainer_run
    assert_memsave_compiled(callback)
    assert not [w for w in caught if "MemsaveCallback" in str(w.message)]


def test_trainer_trains_and_saves_the_adapter(trainer_run):
    model, before, _, _, adapter, _ = trainer_run
    assert_trained(model, before)
    assert_adapter_saved(model, adapter)


def test_trainer_reports_the_evaluation_loss(trainer_run):
    _, _, callback, metrics, _, _ = trainer_run
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert any(not graph.has_backward for graph in callback.compiler.compiled)  # evaluation: no backward


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_sft_trainer_applies_peft_then_memsave_compiles(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (15,), generator=generator)) for _ in range(8)]
    callback = MemsaveCallback()
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, max_length=16, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=word_tokenizer(),
        peft_config=lora_config(), callbacks=[callback],
    )  # fmt: skip
    before = trainable(trainer.model)
    trainer.train()
    assert_memsave_compiled(callback)
    assert_trained(trainer.model, before)
    trainer.save_model(str(tmp_path / "adapter"))
    assert_adapter_saved(trainer.model, tmp_path / "adapter")


def test_the_callback_refuses_the_trainers_own_compile(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=True, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="leave TrainingArguments' torch_compile off"):
        Trainer(model=tiny_llama(), args=args, callbacks=[MemsaveCallback()])


def test_the_callback_refuses_a_misspelt_option():
    with pytest.raises(ValueError, match="did you mean memsave's 'share_norms'"):
        MemsaveCallback(share_norm=True)


class EagerOnly(nn.Module):
    """A model whose forward Dynamo skips, on every torch version."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_the_callback_warns_when_nothing_was_compiled():
    model = EagerOnly()
    callback = MemsaveCallback()
    callback.on_train_begin(None, None, None, model=model)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match="compiled no graph with a backward, so memsave changed nothing"):
        callback.on_step_end(None, None, None, model=model)


def test_the_routes_the_readme_says_fail_still_fail(tmp_path):
    # The README tells users not to take these routes; if accelerate starts accepting any
    # backend name, this test says so and the README should change.
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="memsave", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="'MEMSAVE' is not a valid DynamoBackend"):
        Trainer(model=tiny_llama(), args=args)
    with pytest.raises(ValueError, match="'MEMSAVE' is not a valid DynamoBackend"):
        Accelerator(dynamo_backend="memsave", cpu=True)


class FrozenBackboneCNN(nn.Module):
    """A trained stem, a frozen convolution, a trained head: memsave drops the frozen conv's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.backbone = nn.Conv2d(8, 8, 3).requires_grad_(False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.backbone(F.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_accelerate_compile_in_place_then_prepare(tmp_path):
    import memsave_fx
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = FrozenBackboneCNN()
    backend = memsave_fx.backend()
    model.compile(backend=backend)  # in place, before prepare: names and state_dict stay the model's
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 10, 10, generator=generator), torch.randint(0, 4, (12,), generator=generator))
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
    before = trainable(model)
    for x, y in loader:
        accelerator.backward(F.cross_entropy(prepared(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert_trained(model, before)
    assert any("backbone" in reason for graph in backend.compiled for reason in _reasons(graph))
    accelerator.save_model(prepared, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    state = accelerator.unwrap_model(prepared).state_dict()
    assert saved.keys() == state.keys() == dict(copy.deepcopy(FrozenBackboneCNN()).state_dict()).keys()
    for name, value in state.items():
        assert torch.equal(saved[name], value), name


def _reasons(graph) -> list[str]:
    return [rewrite.reason for rewrite in graph.rewrites or () if rewrite.applied]
