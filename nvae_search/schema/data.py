"""The ``data`` section of a recipe: which dataset, where its files are, and how images are prepared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .cells import Strict

__all__ = ["DataConfig", "DatasetName"]

DatasetName = Literal["mnist", "binarized_mnist", "idx", "cifar10", "image_folder"]


class DataConfig(Strict):
    dataset: DatasetName = Field("mnist", description="mnist = the embedded, dynamically binarised MNIST.")
    root: str | None = Field(None, description="Folder holding the files; null = the embedded copy (mnist only).")
    binarize: Literal["dynamic", "none"] = Field("dynamic", description="For grey-level data: Bernoulli draw per load.")
    pad: int = Field(2, ge=0, description="Zero padding on each side (MNIST 28 → 32).")
    center_crop: int | None = Field(None, ge=1, description="Centre crop side before resizing (image folders).")
    train_images: str = Field("train-images-idx3-ubyte.gz", description="IDX image file for training (dataset idx).")
    test_images: str = Field("t10k-images-idx3-ubyte.gz", description="IDX image file for evaluation (dataset idx).")
    valid_fraction: float = Field(0.0, ge=0, lt=1, description="Image folders: fraction held out for evaluation.")
    hflip: bool = Field(False, description="Random horizontal flip (p = 0.5) of training images; never at evaluation.")
    crop_box: tuple[int, int, int, int] | None = Field(
        None,
        description="Image folders: (left, top, width, height) cropped before resizing, in pixels of an image "
        "crop_box_width wide, scaled to each image's width (CelebA 64: [15, 40, 148, 148] on 178).",
    )
    crop_box_width: int | None = Field(None, ge=1, description="Width the crop_box is given for (null: as is).")
    resize_filter: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="Image folders: PIL filter of the resize (the official CelebA 64 uses bilinear)."
    )
    partition: Literal["auto", "folders", "celeba", "permutation"] = Field(
        "auto",
        description="Image folders: how train and evaluation images are split. auto = train/ and valid/ folders "
        "when both exist, else the sorted tail (valid_fraction); folders = those folders, required; celeba = "
        "list_eval_partition.txt (train 0, evaluation = validation 1) when present, else auto; permutation = a "
        "seeded permutation saved beside the data and reused, its last valid_fraction held out (FFHQ).",
    )
    limit_train: int | None = Field(None, ge=1, description="Use only the first N training images.")
    limit_eval: int | None = Field(None, ge=1, description="Use only the first N evaluation images.")
    num_workers: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.dataset in ("binarized_mnist", "idx", "cifar10", "image_folder") and not self.root:
            raise ValueError(f"dataset '{self.dataset}' needs data.root (the folder holding its files)")
        if self.crop_box is not None and self.center_crop is not None:
            raise ValueError("set either data.crop_box or data.center_crop, not both")
        if self.crop_box is not None and min(self.crop_box[2:]) < 1:
            raise ValueError(f"data.crop_box {list(self.crop_box)}: width and height must be positive")
        if self.partition == "permutation" and self.valid_fraction == 0:
            raise ValueError("data.partition 'permutation' holds out valid_fraction of the images: set it above 0")
        return self
