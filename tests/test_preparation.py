"""The official data preparation (NVAE_SPEC §5): flips, the CelebA 64 crop box and resize, official partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvae_search.data import PERMUTATION_FILE, DataError, build_dataset, random_hflip
from nvae_search.schema import DataConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CELEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba_sample" / "img_align_celeba_first10k"
PAPER = {p.stem: load_recipe(p) for p in sorted((ROOT / "recipes" / "paper").glob("*.yaml"))}


def noise_image(path: Path, size: tuple[int, int], seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def folder_cfg(root: Path, **fields: object) -> DataConfig:
    return DataConfig.model_validate({"dataset": "image_folder", "root": str(root), **fields})


# ------------------------------------------------------------------------------------------------- flips
def test_random_hflip_mirrors_about_half_of_the_images_and_nothing_else() -> None:
    x = torch.rand(400, 3, 4, 4)
    torch.manual_seed(0)
    y = random_hflip(x)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250
    torch.manual_seed(0)
    torch.testing.assert_close(random_hflip(x), y)  # the global seed fixes it (resume is exact)


def test_paper_recipes_flip_where_the_official_code_does() -> None:
    flips = {name: recipe.data.hflip for name, recipe in PAPER.items()}
    assert flips == {
        "celeba64": True,
        "celebahq256": True,
        "cifar10": True,
        "ffhq256": True,
        "imagenet32": True,
        "mnist": False,
    }


def test_trainer_flips_training_batches_only(tmp_path: Path) -> None:
    from nvae_search.train import Trainer

    recipe = load_recipe(ROOT / "recipes/cpu/tiny.yaml", {"data.hflip": True, "data.limit_train": 64})
    trainer = Trainer(recipe, tmp_path, torch.device("cpu"), None)
    x = torch.rand(64, 1, 32, 32).round()
    torch.manual_seed(1)
    train_x = trainer.training_batch(x)
    assert not torch.equal(train_x, x)
    assert torch.equal(trainer.prepare(x), x)  # evaluation's preparation never flips


# -------------------------------------------------------------------------------------- CelebA 64 crop
@pytest.mark.parametrize(("size", "box"), [((178, 218), (15, 40, 163, 188)), ((89, 109), (8, 20, 82, 94))])
def test_celeba_crop_box_scales_with_the_image_and_resizes_bilinearly(
    tmp_path: Path, size: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    pixels = noise_image(tmp_path / "000001.png", size, seed=0)
    cfg = folder_cfg(
        tmp_path, crop_box=[15, 40, 148, 148], crop_box_width=178, resize_filter="bilinear", valid_fraction=0
    )
    got = build_dataset(cfg, split="train", resolution=64, channels=3).images[0]
    expected = np.array(Image.fromarray(pixels).crop(box).resize((64, 64), Image.Resampling.BILINEAR))
    assert torch.equal(got, torch.from_numpy(expected).permute(2, 0, 1))


def test_paper_celeba64_recipe_uses_the_official_box_filter_and_partition() -> None:
    data = PAPER["celeba64"].data
    assert (data.crop_box, data.crop_box_width, data.resize_filter, data.partition, data.center_crop) == (
        (15, 40, 148, 148),
        178,
        "bilinear",
        "celeba",
        None,
    )


def test_crop_box_outside_the_image_is_a_data_error(tmp_path: Path) -> None:
    noise_image(tmp_path / "a.png", (100, 100), seed=0)
    cfg = folder_cfg(tmp_path, crop_box=[15, 40, 148, 148], valid_fraction=0)
    with pytest.raises(DataError, match="not inside the image"):
        build_dataset(cfg, split="train", resolution=64, channels=3)


@pytest.mark.skipif(not CELEBA.is_dir(), reason="no ../shared/data/celeba_sample")
def test_shared_celeba_sample_prepares_like_the_official_loader() -> None:
    cfg = PAPER["celeba64"].data.model_copy(update={"root": str(CELEBA), "limit_train": 4, "limit_eval": 2})
    train = build_dataset(cfg, split="train", resolution=64, channels=3)
    assert tuple(train.images.shape) == (4, 3, 64, 64)
    with Image.open(CELEBA / "000001.jpg") as src:
        expected = np.asarray(src.convert("RGB").crop((8, 20, 82, 94)).resize((64, 64), Image.Resampling.BILINEAR))
    assert torch.equal(train.images[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    # No list_eval_partition.txt beside the sample: the sorted tail is held out, disjoint from training.
    assert len(build_dataset(cfg, split="test", resolution=64, channels=3)) == 2


# ------------------------------------------------------------------------------------------ partitions
def test_celeba_partition_file_trains_on_0_and_evaluates_on_the_validation_partition(tmp_path: Path) -> None:
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    labels = {"000001.png": 0, "000002.png": 1, "000003.png": 2, "000004.png": 0, "000005.png": 1}
    for i, name in enumerate(labels):
        noise_image(images / name, (178, 218), seed=i)
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{k} {v}\n" for k, v in labels.items()))
    cfg = folder_cfg(images, partition="celeba", crop_box=[15, 40, 148, 148], crop_box_width=178, valid_fraction=0.5)
    train = build_dataset(cfg, split="train", resolution=16, channels=3)
    test = build_dataset(cfg, split="test", resolution=16, channels=3)
    assert len(train) == 2 and len(test) == 2
    only = folder_cfg(images, crop_box=[15, 40, 148, 148], crop_box_width=178, valid_fraction=0)
    every = build_dataset(only, split="train", resolution=16, channels=3).images  # sorted: 000001 … 000005
    assert torch.equal(train.images, every[[0, 3]])
    assert torch.equal(test.images, every[[1, 4]])  # the validation partition, not the test partition (2)


def test_permutation_partition_is_saved_beside_the_data_and_reused(tmp_path: Path) -> None:
    for i in range(20):
        noise_image(tmp_path / f"{i:05d}.png", (8, 8), seed=i)
    cfg = folder_cfg(tmp_path, partition="permutation", valid_fraction=0.1)
    train = build_dataset(cfg, split="train", resolution=8, channels=3).images
    test = build_dataset(cfg, split="test", resolution=8, channels=3).images
    assert (len(train), len(test)) == (18, 2)  # FFHQ's 63,000 / 7,000 in proportion
    saved = json.loads((tmp_path / PERMUTATION_FILE).read_text())["order"]
    assert sorted(saved) == [f"{i:05d}.png" for i in range(20)] and saved != sorted(saved)
    # Reused as saved, even when it is not the permutation this version would draw.
    (tmp_path / PERMUTATION_FILE).write_text(json.dumps({"order": list(reversed(saved))}))
    again = build_dataset(cfg, split="test", resolution=8, channels=3).images
    assert torch.equal(again, train[[1, 0]])
    noise_image(tmp_path / "extra.png", (8, 8), seed=99)
    with pytest.raises(DataError, match="delete the file"):
        build_dataset(cfg, split="train", resolution=8, channels=3)


def test_folders_partition_requires_a_separate_validation_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    noise_image(tmp_path / "train" / "a.png", (32, 32), seed=0)
    noise_image(tmp_path / "b.png", (32, 32), seed=1)
    cfg = folder_cfg(tmp_path, partition="folders")
    with pytest.raises(DataError, match="separate validation folder"):
        build_dataset(cfg, split="test", resolution=32, channels=3)
    (tmp_path / "valid").mkdir()
    noise_image(tmp_path / "valid" / "c.png", (32, 32), seed=2)
    assert len(build_dataset(cfg, split="test", resolution=32, channels=3)) == 1
    assert PAPER["imagenet32"].data.partition == "folders"
    assert (PAPER["ffhq256"].data.partition, PAPER["ffhq256"].data.valid_fraction) == ("permutation", 0.1)
