"""memsave under Lightning: compile the network in `configure_model`, or the LightningModule
with torch.compile. Lightning passes any backend name through; no helper is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memsave_fx

from .test_huggingface import FrozenBackboneCNN, _reasons, assert_trained, trainable

pytestmark = pytest.mark.slow

L = pytest.importorskip("lightning")


class Classifier(L.LightningModule):
    def __init__(self, compile_in_configure_model: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = FrozenBackboneCNN()
        self.memsave = memsave_fx.backend()
        self.compile_in_configure_model = compile_in_configure_model

    def configure_model(self) -> None:
        if self.compile_in_configure_model:
            self.net.compile(backend=self.memsave)  # in place: the checkpoint's names stay the model's

    def training_step(self, batch, batch_index):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def loader():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 10, 10, generator=generator), torch.randint(0, 4, (12,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("route", ["configure_model", "torch.compile"])
def test_lightning_trains_with_memsave_and_checkpoints_normal_names(route, tmp_path):
    module = Classifier(compile_in_configure_model=route == "configure_model")
    fitted = module if route == "configure_model" else torch.compile(module, backend=module.memsave)
    before = trainable(module)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(fitted, loader())
    assert_trained(module, before)
    assert any("backbone" in reason for graph in module.memsave.compiled for reason in _reasons(graph))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state.keys() == {f"net.{name}" for name in FrozenBackboneCNN().state_dict()}
    for name, value in module.state_dict().items():
        assert torch.equal(state[name], value), name
