"""The EMA copy of the weights (train.ema_decay) is evaluated with batch-norm statistics of its own weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nvae_search.checkpoint import load_checkpoint
from nvae_search.data import ImageTensorDataset
from nvae_search.runs import load_run
from nvae_search.schema import load_recipe
from nvae_search.train import train
from nvae_search.training.ema import recalibrate_batch_norm

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
QUIET = {"train.progress": False, "train.eval_images": 16, "train.eval_iw_samples": 2, "train.log_every": 5}


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_recalibration_sets_the_exact_statistics_of_the_batches_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(0)
    images = (torch.rand(40, 1, 4, 4) * 255).to(torch.uint8)
    dataset = ImageTensorDataset(images)
    conv, bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(conv, bn)
    bn.running_mean.fill_(5.0)  # stale statistics that an average would keep a share of
    state = torch.get_rng_state()
    recalibrate_batch_norm(model, dataset, lambda x: x, batches=3, batch_size=8, seed=1, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert bn.momentum == 0.1  # its settings are given back
    # The 24 images the three batches drew: the BN input's mean over them, channel by channel.
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1 + 7_919))[:24]
    with torch.no_grad():
        out = conv(dataset.images[order].float() / 255)
    torch.testing.assert_close(bn.running_mean, out.mean(dim=(0, 2, 3)))
    again = nn.Sequential(conv, nn.BatchNorm2d(3))
    recalibrate_batch_norm(again, dataset, lambda x: x, batches=3, batch_size=8, seed=1, device=torch.device("cpu"))
    assert torch.equal(again[1].running_var, bn.running_var)  # the same checkpoint always gets the same statistics


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema_run")
    recipe = load_recipe(
        TINY, overrides={**QUIET, "train.steps": 12, "train.ema_decay": 0.9, "train.ema_bn_batches": 4}
    )
    assert train(recipe, out).status == "completed"
    return out


def test_the_end_of_a_run_gives_the_ema_copy_its_own_statistics(ema_run: Path) -> None:
    state = load_checkpoint(ema_run / "checkpoint.pt")
    assert state["ema_bn_recalibrated"] is True
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items() if "running_" in k}
    trained = {k: v for k, v in state["model"].items() if "running_" in k}
    # Neither the trained network's statistics nor their average: the EMA weights' own.
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    loaded = load_run(ema_run, "cpu")
    assert loaded.weights == "ema"
    assert all(torch.equal(v, averaged[k]) for k, v in bn_buffers(loaded.model).items())


def test_an_ema_checkpoint_saved_without_them_gets_the_same_statistics_when_loaded(
    ema_run: Path, tmp_path: Path
) -> None:
    """A mid-run checkpoint (or one of an older version) says its EMA statistics are averages: ``eval`` and
    ``sample`` re-estimate them exactly as the end of the run does."""
    state = load_checkpoint(ema_run / "checkpoint.pt")
    end_of_run = {k.removeprefix("module."): v.clone() for k, v in state["ema"].items() if "running_" in k}
    mid_run = tmp_path / "mid"
    mid_run.mkdir()
    (mid_run / "recipe.resolved.yaml").write_text((ema_run / "recipe.resolved.yaml").read_text())
    for k in state["ema"]:
        if "running_mean" in k:
            state["ema"][k].fill_(3.0)  # averaged statistics, unfit for the weights
    state["ema_bn_recalibrated"] = False
    torch.save(state, mid_run / "checkpoint.pt")
    loaded = bn_buffers(load_run(mid_run, "cpu").model)
    for k, v in loaded.items():
        torch.testing.assert_close(v, end_of_run[k])
