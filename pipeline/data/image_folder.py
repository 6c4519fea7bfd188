"""An image folder, `root/<class>/*.png|jpg|jpeg`, the layout most users keep their images in.

Classes are the sub-folder names in sorted order (label 0 is the first). Pixels are scaled to
[0, 1], which is the domain box. Channels and size are declared in params: `data.image_channels`
(1: grayscale, 3: RGB; default 1 when every image is grayscale, else 3) and `data.image_size`
([height, width], resized bilinearly; default: the images' own size, which must then be common).
Read with Pillow (no torchvision: no CPU build matches the pinned torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.errors import UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_files(folder: Path, root: Optional[Path] = None) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(file, label) for every image under the class folders, and the class names."""
    if folder is None or not folder.is_dir():
        raise UsageError(f"data.path = {str(folder)!r}: an image folder must be a directory of class folders")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if len(classes) < 2:
        raise UsageError(f"{folder}: need at least two class folders (root/<class>/*.png), found {len(classes)}")
    files = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (folder / name).iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if not found:
            raise UsageError(f"{folder / name}: no .png/.jpg images in class folder {name!r}")
        for file in found:
            if root is not None and not file.resolve().is_relative_to(root.resolve()):
                raise UsageError(f"{file}: links outside the workspace {root}")
            files.append((file, label))
    return files, classes


def _open(file: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UsageError(f"{file}: not a readable image ({error})") from None


def load_image_folder(folder: Optional[Path], root: Optional[Path] = None,
                      image_size: Optional[Sequence[int]] = None, channels: Optional[int] = None):
    """The folder as a RawDataset of float32 (N, C, H, W) in [0, 1]."""
    from PIL import Image

    from pipeline.data.datasets import RawDataset

    files, classes = image_files(folder, root)
    images = [_open(file) for file, _ in files]
    if channels is None:
        channels = 1 if all(image.mode in _GRAY_MODES for image in images) else 3
    mode = "L" if channels == 1 else "RGB"
    if image_size is None:
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
            raise UsageError(f"{folder}: images of {len(sizes)} different sizes ({shown}...); "
                             "set data.image_size: [height, width] to resize them")
    pixels = np.empty((len(images), channels, *(image_size or images[0].size[::-1])), dtype=np.float32)
    for i, image in enumerate(images):
        image = image.convert(mode)
        if image_size is not None and image.size != (image_size[1], image_size[0]):
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        pixels[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return RawDataset(pixels, labels, False, np.zeros(1, np.float32), np.ones(1, np.float32), classes)
