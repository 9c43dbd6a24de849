"""Dataset loading: real files from ../shared/data when present, and small files written here in the real formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nvae_search import data
from nvae_search.data import DataError, build_dataset, needs_binarize, prepare_batch
from nvae_search.image_folders import image_folder_files
from nvae_search.schema import DataConfig


def shared_data() -> Path:
    """``../shared/data`` next to the repository: present on the project's machines, absent from a user's clone."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = shared_data()
needs_shared_mnist = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no ../shared/data/mnist")
needs_shared_binarized = pytest.mark.skipif(
    not (SHARED / "binarized_mnist").is_dir(), reason="no ../shared/data/binarized_mnist"
)
CELEBA = SHARED / "celeba_sample" / "img_align_celeba_first10k"
needs_shared_celeba = pytest.mark.skipif(not CELEBA.is_dir(), reason="no ../shared/data/celeba_sample")


@pytest.fixture(scope="module")
def embedded_mnist_test() -> data.ImageTensorDataset:
    return build_dataset(DataConfig(), split="test", resolution=32, channels=1)


# ------------------------------------------------------------------------------------------ writers
def write_idx(path: Path, images: np.ndarray, *, magic: int = 0x00000803, gz: bool = False) -> Path:
    header = np.array([magic, *images.shape], ">u4").tobytes()
    payload = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_amat(path: Path, bits: np.ndarray) -> Path:
    lines = [" ".join(str(int(v)) for v in row.ravel()) for row in bits]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_cifar_batch(path: Path, images: np.ndarray) -> None:
    """Like the original release: a dict with bytes keys, rows of R, G then B planes, pickled with protocol 2."""
    batch = {
        b"batch_label": b"testing batch",
        b"data": images.reshape(len(images), -1).astype(np.uint8),
        b"labels": [0] * len(images),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def solid_cifar(n: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8)[None, :, None, None], (n, 3, 32, 32)).copy()


def write_cifar(folder: Path, *, per_batch: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", solid_cifar(per_batch, (255, 0, 0)))
    write_cifar_batch(folder / "test_batch", solid_cifar(per_batch, (0, 0, 255)))
    return folder


def cfg(**kwargs: Any) -> DataConfig:
    return DataConfig(**kwargs)


# ------------------------------------------------------------------------------------- shared files
@needs_shared_mnist
def test_shared_mnist_sizes_padding_and_range() -> None:
    root = str(SHARED / "mnist")
    train = build_dataset(cfg(root=root), split="train", resolution=32, channels=1)
    test = build_dataset(cfg(root=root), split="test", resolution=32, channels=1)
    assert (len(train), len(test)) == (60000, 10000)
    x = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    for images in (train.images, test.images):
        assert images[:, :, :2].max() == 0 and images[:, :, -2:].max() == 0
        assert images[:, :, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    grey = torch.stack([test[i] for i in range(100)])
    assert ((grey > 0) & (grey < 1)).any(), "grey levels must survive: binarization is batch-wise"


@needs_shared_mnist
def test_embedded_mnist_equals_shared_copy(embedded_mnist_test: data.ImageTensorDataset) -> None:
    shared = build_dataset(cfg(root=str(SHARED / "mnist")), split="test", resolution=32, channels=1)
    assert torch.equal(embedded_mnist_test.images, shared.images)
    embedded_dir = Path(data.__file__).parent / "datasets" / "mnist"
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (embedded_dir / name).read_bytes() == (SHARED / "mnist" / name).read_bytes()


@needs_shared_binarized
def test_shared_binarized_mnist() -> None:
    root = str(SHARED / "binarized_mnist")
    train = build_dataset(cfg(dataset="binarized_mnist", root=root), split="train", resolution=32, channels=1)
    test = build_dataset(cfg(dataset="binarized_mnist", root=root), split="test", resolution=32, channels=1)
    assert (len(train), len(test)) == (50000, 10000)
    assert set(test.images.unique().tolist()) == {0, 255}
    x = train[123]
    assert x.shape == (1, 32, 32) and set(x.unique().tolist()) == {0.0, 1.0}
    assert not needs_binarize(cfg(dataset="binarized_mnist", root=root))


@needs_shared_celeba
def test_shared_celeba_split_sizes() -> None:
    train = image_folder_files(CELEBA, "train", 0.1)
    test = image_folder_files(CELEBA, "test", 0.1)
    assert (len(train), len(test)) == (9000, 1000)
    assert train[-1] < test[0] and not set(train) & set(test)


@needs_shared_celeba
def test_shared_celeba_crop_resize(tmp_path: Path) -> None:
    for path in sorted(CELEBA.iterdir())[:50]:
        (tmp_path / path.name).symlink_to(path)
    c = cfg(dataset="image_folder", root=str(tmp_path), center_crop=74, valid_fraction=0.1)
    train = build_dataset(c, split="train", resolution=64, channels=3)
    test = build_dataset(c, split="test", resolution=64, channels=3)
    assert (len(train), len(test)) == (45, 5)
    assert train[0].shape == (3, 64, 64) and train[0].dtype == torch.float32
    assert train.images.float().std() > 10  # real photographs, not a constant
    limited = build_dataset(c.model_copy(update={"limit_train": 7}), split="train", resolution=64, channels=3)
    assert torch.equal(limited.images, train.images[:7])


# ------------------------------------------------------------------------------------ embedded MNIST
def test_embedded_mnist_loads(embedded_mnist_test: data.ImageTensorDataset) -> None:
    assert len(embedded_mnist_test) == 10000
    x = embedded_mnist_test[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert embedded_mnist_test.images[:, :, :2].max() == 0
    assert needs_binarize(DataConfig()) and not needs_binarize(cfg(binarize="none"))


def test_limits_and_dataloader_batches(embedded_mnist_test: data.ImageTensorDataset) -> None:
    limited = build_dataset(cfg(limit_eval=10, pad=0), split="test", resolution=28, channels=1)
    assert len(limited) == 10
    assert torch.equal(limited.images, embedded_mnist_test.images[:10, :, 2:-2, 2:-2])
    batch = next(iter(DataLoader(limited, batch_size=4, shuffle=False)))
    assert batch.shape == (4, 1, 28, 28) and torch.equal(batch[1], limited[1])


# ----------------------------------------------------------------------------------------------- IDX
def test_idx_pair_plain_and_gz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train)  # unpacked, though the config names the .gz
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test, gz=True)
    c = cfg(dataset="idx", root=str(tmp_path))
    ds_train = build_dataset(c, split="train", resolution=32, channels=1)
    ds_test = build_dataset(c, split="test", resolution=32, channels=1)
    assert (len(ds_train), len(ds_test)) == (5, 3)
    assert torch.equal(ds_train.images[:, 0, 2:-2, 2:-2], torch.from_numpy(train))
    assert torch.allclose(ds_test[2][0, 2:-2, 2:-2], torch.from_numpy(test[2]).float() / 255)
    assert needs_binarize(c)
    mnist = build_dataset(cfg(root=str(tmp_path), limit_train=2), split="train", resolution=32, channels=1)
    assert torch.equal(mnist.images, ds_train.images[:2])


def test_idx_custom_names(tmp_path: Path) -> None:
    write_idx(tmp_path / "fashion-train.idx", np.full((2, 28, 28), 7, np.uint8))
    c = cfg(dataset="idx", root=str(tmp_path), train_images="fashion-train.idx", pad=0)
    ds = build_dataset(c, split="train", resolution=28, channels=1)
    assert ds.images.shape == (2, 1, 28, 28) and int(ds.images.max()) == 7


def test_idx_truncated(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as err:
        build_dataset(cfg(dataset="idx", root=str(tmp_path)), split="train", resolution=32, channels=1)
    assert str(path) in str(err.value)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8), magic=0x801, gz=True)
    with pytest.raises(DataError, match=r"0x00000801.*0x00000803") as err:
        build_dataset(cfg(dataset="idx", root=str(tmp_path)), split="train", resolution=32, channels=1)
    assert str(path) in str(err.value)


def test_idx_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_dataset(cfg(dataset="idx", root=str(tmp_path)), split="test", resolution=32, channels=1)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value) and str(tmp_path) in str(err.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        build_dataset(cfg(root=str(missing)), split="train", resolution=32, channels=1)
    assert "train-images-idx3-ubyte.gz" in str(err.value) and str(missing) in str(err.value)


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"1×32×32.*1×28×28"):
        build_dataset(cfg(dataset="idx", root=str(tmp_path)), split="train", resolution=28, channels=1)


# ---------------------------------------------------------------------------------------------- amat
def test_amat_train_and_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bits_train = rng.integers(0, 2, (6, 784))
    bits_test = rng.integers(0, 2, (2, 784))
    write_amat(tmp_path / "binarized_mnist_train.amat", bits_train)
    write_amat(tmp_path / "binarized_mnist_valid.amat", 1 - bits_train)  # never read
    amat_test = write_amat(tmp_path / "binarized_mnist_test.amat", bits_test)
    amat_test.with_suffix(".amat.gz").write_bytes(gzip.compress(amat_test.read_bytes()))
    amat_test.unlink()
    c = cfg(dataset="binarized_mnist", root=str(tmp_path))
    train = build_dataset(c, split="train", resolution=32, channels=1)
    test = build_dataset(c, split="test", resolution=32, channels=1)
    assert (len(train), len(test)) == (6, 2)
    expected = torch.from_numpy(bits_train.reshape(6, 28, 28)).float()
    assert torch.equal(torch.stack([train[i][0, 2:-2, 2:-2] for i in range(6)]), expected)
    assert set(test[1].unique().tolist()) <= {0.0, 1.0}
    assert float(train[0][0, :2].abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (" ".join(["0"] * 783), "783 values"),
        (" ".join(["0"] * 783 + ["2"]), "unexpected character '2'"),
        ("10 " * 783 + "1", "a value other than 0 or 1"),
        (" ".join(["0"] * 782 + ["10"]), "a value other than 0 or 1"),  # 784 digits, two of them glued together
    ],
)
def test_amat_malformed(tmp_path: Path, row: str, problem: str) -> None:
    good = " ".join(["1"] * 784)
    path = tmp_path / "binarized_mnist_train.amat"
    path.write_text(f"{good}\n{row}\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(dataset="binarized_mnist", root=str(tmp_path)), split="train", resolution=32, channels=1)
    # The problem is read after the path: the path holds the test's id, which holds the expected words.
    where, _, reason = str(err.value).partition(f"{path} line 2: ")
    assert where and reason.startswith(problem)


# ------------------------------------------------------------------------------------------ CIFAR-10
@pytest.mark.parametrize("nested", [True, False])
def test_cifar_batches_and_channel_order(tmp_path: Path, nested: bool) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    c = cfg(dataset="cifar10", root=str(tmp_path))
    train = build_dataset(c, split="train", resolution=32, channels=3)
    test = build_dataset(c, split="test", resolution=32, channels=3)
    assert (len(train), len(test)) == (20, 4)
    red, blue = train[7], test[0]
    assert red.shape == (3, 32, 32) and red.dtype == torch.float32
    assert torch.equal(red[0], torch.ones(32, 32)) and red[1:].abs().sum() == 0
    assert torch.equal(blue[2], torch.ones(32, 32)) and blue[:2].abs().sum() == 0
    assert not needs_binarize(c)
    assert len(build_dataset(c.model_copy(update={"limit_train": 6}), split="train", resolution=32, channels=3)) == 6


def test_cifar_row_major_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, per_batch=1)
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 1, 0, 5] = 200  # green, row 0, column 5
    image[0, 2, 31, 0] = 100  # blue, last row, column 0
    write_cifar_batch(folder / "test_batch", image)
    x = build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)[0]
    assert x[1, 0, 5] == pytest.approx(200 / 255) and x[2, 31, 0] == pytest.approx(100 / 255)
    assert int((x > 0).sum()) == 2


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what cPickle wrote for the original batches: str/bytes as BINSTRING, numpy.core globals."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def test_cifar_python2_pickle(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, per_batch=1)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({b"data": solid_cifar(3, (0, 255, 0)).reshape(3, -1), b"labels": [1, 2, 3]})
    assert b"numpy.core.multiarray\n_reconstruct" in buf.getvalue() and b"_codecs" not in buf.getvalue()
    (folder / "test_batch").write_bytes(buf.getvalue())
    test = build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)
    assert len(test) == 3 and torch.equal(test[2][1], torch.ones(32, 32)) and test[2][0::2].abs().sum() == 0


def test_cifar_missing_batch(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=1)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing: data_batch_3$") as err:
        build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="train", resolution=32, channels=3)
    assert "data_batch_1..5 and test_batch" in str(err.value) and str(folder) in str(err.value)
    assert len(build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)) == 1


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        build_dataset(cfg(dataset="cifar10", root=str(tmp_path / "x")), split="test", resolution=32, channels=3)
    assert "test_batch" in str(err.value) and str(tmp_path / "x") in str(err.value)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_forbidden_global_is_refused_unrun(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=1)
    marker = tmp_path / "pwned"
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(DataError, match=r"system is not allowed") as err:
        build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)
    assert str(folder / "test_batch") in str(err.value) and "data_batch_1..5 and test_batch" in str(err.value)
    assert not marker.exists()


def test_cifar_wrong_content(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path, per_batch=1)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8)}, f, protocol=2)
    with pytest.raises(DataError, match=r"N×3072 uint8 array, found uint8 \(2, 100\)"):
        build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 batch"):
        build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)


# -------------------------------------------------------------------------------------- image folder
def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def test_image_folder_split_subfolders_crop_and_resize(tmp_path: Path) -> None:
    big = np.zeros((40, 60, 3), np.uint8)
    big[10:30, 20:40] = (0, 255, 0)  # the 20×20 centre is green; the border is black
    save(tmp_path / "train" / "b" / "2.png", big)
    save(tmp_path / "train" / "a" / "1.PNG", np.full((20, 20, 3), (255, 0, 0), np.uint8))
    save(tmp_path / "valid" / "x.jpg", np.full((24, 24, 3), (0, 0, 255), np.uint8))
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    c = cfg(dataset="image_folder", root=str(tmp_path), center_crop=20, valid_fraction=0.5)
    train = build_dataset(c, split="train", resolution=8, channels=3)
    test = build_dataset(c, split="test", resolution=8, channels=3)
    assert (len(train), len(test)) == (2, 1)  # subfolders win over valid_fraction
    assert train.images.shape == (2, 3, 8, 8)
    assert torch.equal(train.images[0], torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    assert torch.equal(train.images[1], torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    blue = test[0]
    assert blue[2].min() > 0.95 and blue[:2].max() < 0.05  # JPEG: nearly, not exactly, pure blue
    grey = build_dataset(c, split="train", resolution=8, channels=1)
    assert grey.images.shape == (2, 1, 8, 8) and int(grey.images[0, 0, 0, 0]) == 76  # ITU-R 601 luma of red


def test_image_folder_resize_is_antialiased(tmp_path: Path) -> None:
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: nearest-neighbour would give all 0 or all 255
    save(tmp_path / "s.png", stripes)
    ds = build_dataset(cfg(dataset="image_folder", root=str(tmp_path)), split="train", resolution=16, channels=1)
    assert ds.images.shape == (1, 1, 16, 16)
    assert abs(float(ds.images[0, 0, 4:-4, 4:-4].float().mean()) - 127.5) < 3


def test_image_folder_valid_fraction(tmp_path: Path) -> None:
    for i in range(10):
        save(tmp_path / f"{i:02d}.png", np.full((4, 4), i * 10, np.uint8))
    c = cfg(dataset="image_folder", root=str(tmp_path), valid_fraction=0.2)
    train = build_dataset(c, split="train", resolution=4, channels=1)
    test = build_dataset(c, split="test", resolution=4, channels=1)
    assert train.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    assert test.images[:, 0, 0, 0].tolist() == [80, 90]
    same = cfg(dataset="image_folder", root=str(tmp_path), limit_eval=3)
    assert build_dataset(same, split="test", resolution=4, channels=1).images[:, 0, 0, 0].tolist() == [0, 10, 20]


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    for root, match in ((tmp_path / "empty", "found none"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(DataError, match=match) as err:
            build_dataset(cfg(dataset="image_folder", root=str(root)), split="train", resolution=8, channels=3)
        assert "PNG/JPEG" in str(err.value) and str(root) in str(err.value)
    small = tmp_path / "small"
    save(small / "a.png", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(DataError, match=r"10×12|12×10"):
        build_dataset(
            cfg(dataset="image_folder", root=str(small), center_crop=11), split="train", resolution=8, channels=3
        )
    (small / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode") as err:
        build_dataset(cfg(dataset="image_folder", root=str(small)), split="train", resolution=8, channels=3)
    assert str(small / "b.png") in str(err.value)


# ------------------------------------------------------------------------------------- prepare_batch
def test_dynamic_binarization() -> None:
    x = torch.full((100_000,), 0.3)
    torch.manual_seed(0)
    a = prepare_batch(x, binarize=True, num_bits=8)
    b = prepare_batch(x, binarize=True, num_bits=8)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(float(a.mean()) - 0.3) < 0.01
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(prepare_batch(x, binarize=True, num_bits=8), a)
    assert torch.equal(prepare_batch(x, binarize=False, num_bits=8), x)


def test_bit_reduction() -> None:
    x = torch.arange(256, dtype=torch.float32) / 255
    y = prepare_batch(x, binarize=False, num_bits=5)
    assert float(y[-1]) == 1.0 and float(y[0]) == 0.0
    levels = y.unique()
    assert len(levels) == 32
    assert torch.allclose(levels, torch.arange(32, dtype=torch.float32) / 31)
    assert torch.equal(torch.bincount(torch.round(y * 31).long()), torch.full((32,), 8))
    assert len(prepare_batch(x, binarize=False, num_bits=1).unique()) == 2


def test_cifar_batch_repickled_with_text_keys(tmp_path: Path) -> None:
    # A batch re-saved by Python 3 code (pickle.dump of a dict with str keys) loads like the original download.
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, per_batch=1)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": solid_cifar(2, (0, 0, 255)).reshape(2, -1), "labels": [0, 1]}, f)
    test = build_dataset(cfg(dataset="cifar10", root=str(tmp_path)), split="test", resolution=32, channels=3)
    assert len(test) == 2 and torch.equal(test[1][2], torch.ones(32, 32)) and test[1][:2].abs().sum() == 0


def test_idx_header_without_images_is_refused(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(DataError) as err:
        build_dataset(cfg(dataset="idx", root=str(tmp_path)), split="train", resolution=32, channels=1)
    assert f"{path} declares 0 images of 28×28: no pixels" in str(err.value)
