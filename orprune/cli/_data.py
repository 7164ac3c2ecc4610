"""The user's own calibration data for ``orprune prune --data``.

``SPEC`` is one of:

- a folder of images (PNG, JPEG, ...): its sub-folders are classes when it has any (labels for
  ``--evaluate``), as torchvision's ``ImageFolder``; pixels become floats in [0, 1];
- a tensor file: ``.pt`` / ``.pth`` holding a tensor, an ``(inputs, labels)`` pair or a dict with
  ``inputs`` / ``images`` / ``x`` (and ``labels`` / ``targets`` / ``y``), read with
  ``torch.load(weights_only=True)``; ``.npy`` (inputs) or ``.npz`` (the same keys);
- ``module:function`` (``module`` a module name or a ``.py`` file): ``function()`` returns the inputs,
  an ``(inputs, labels)`` pair, or an iterable of batches (tensors or ``(inputs, labels)``, a
  DataLoader); any preprocessing (normalisation, resizing) belongs there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orprune.cli._io import UsageError, import_user_module

__all__ = ["DATA_HELP", "load_data"]

DATA_HELP = ("your calibration data: a folder of images (sub-folders = classes), a .pt/.pth/.npy/.npz tensor file "
             "(inputs, or inputs and labels), or MODULE:FUNCTION (a module name or FILE.py) returning inputs, "
             "(inputs, labels) or an iterable of batches")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_INPUT_KEYS = ("inputs", "images", "x", "data")
_LABEL_KEYS = ("labels", "targets", "y")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not torch.is_tensor(value):
        raise UsageError(f"{what} is a {type(value).__name__}, not a tensor or array")
    if value.dtype == torch.uint8:
        return value.float() / 255.0  # 8-bit pixels
    if not value.is_floating_point():
        raise UsageError(f"{what} holds {value.dtype} values; the inputs must be floats (or 8-bit pixels)")
    return value.float()


def _pair(obj: Any, what: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and optional labels from a tensor, a pair, a dict or an iterable of batches."""
    if isinstance(obj, dict):
        x_key = next((k for k in _INPUT_KEYS if k in obj), None)
        if x_key is None:
            raise UsageError(f"{what} is a dict without any of the keys {list(_INPUT_KEYS)}")
        y_key = next((k for k in _LABEL_KEYS if k in obj), None)
        return _as_tensor(obj[x_key], what), None if y_key is None else torch.as_tensor(obj[y_key]).long()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _as_tensor(obj, what), None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(o, (np.ndarray, torch.Tensor)) for o in obj):
        if len(obj[0]) != len(obj[1]):
            raise UsageError(f"{what}: {len(obj[0])} inputs but {len(obj[1])} labels")
        return _as_tensor(obj[0], what), torch.as_tensor(obj[1]).long()
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        xs, ys, n = [], [], 0
        for batch in obj:  # stop once there are enough inputs: a DataLoader may be endless or huge
            x, y = _pair(batch, f"a batch of {what}", None)
            xs.append(x)
            ys.append(y)
            n += len(x)
            if limit is not None and n >= limit:
                break
        if not xs:
            raise UsageError(f"{what} gave no batches")
        try:
            inputs = torch.cat(xs)
        except RuntimeError as exc:
            raise UsageError(f"{what}: the batches' inputs differ in shape ({exc})") from exc
        labels = torch.cat(ys) if all(y is not None for y in ys) else None
        return inputs, labels
    raise UsageError(f"{what} is a {type(obj).__name__}; expected a tensor, (inputs, labels), a dict or batches")


def _images(folder: Path, image_size: int | None, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise UsageError("reading a folder of images needs Pillow (pip install pillow)") from exc
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).rglob("*"))
                 if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
    opened = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                opened.append(im.copy())
        except Exception as exc:
            raise UsageError(f"cannot read image {f}: {exc}") from exc
    if mode == "auto":
        mode = "L" if all(im.mode in ("1", "L", "I", "I;16", "F") for im in opened) else "RGB"
    arrays = []
    for (f, _), im in zip(files, opened):
        im = im.convert(mode)
        if image_size is not None:
            im = im.resize((image_size, image_size), Image.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], -1))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise UsageError(f"the images in {folder} differ in size ({sorted(sizes)[:3]}...); pass --image-size N")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.tensor([i for _, i in files]) if classes else None
    return x.contiguous(), labels


def load_data(spec: str, *, limit: int | None = None, image_size: int | None = None, image_mode: str = "auto",
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (float) and labels (or None) from ``spec``; at most ``limit`` of them, a seeded random subset."""
    path = Path(spec)
    if path.is_dir():
        x, y = _images(path, image_size, image_mode)
    elif path.suffix.lower() in (".pt", ".pth", ".npy", ".npz") or path.exists():
        if not path.is_file():
            raise UsageError(f"data file {spec} does not exist")
        try:
            if path.suffix.lower() == ".npy":
                obj = np.load(path, allow_pickle=False)
            elif path.suffix.lower() == ".npz":
                with np.load(path, allow_pickle=False) as archive:
                    obj = {k: archive[k] for k in archive.files}
                if len(obj) == 1:
                    obj = next(iter(obj.values()))
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"cannot read data file {spec} ({reason})") from exc
        x, y = _pair(obj, f"data file {spec}", None)
    elif ":" in spec:
        module_spec, _, name = spec.rpartition(":")
        module = import_user_module(module_spec)
        function = getattr(module, name, None)
        if not callable(function):
            raise UsageError(f"{module_spec} has no function {name!r}")
        try:
            obj = function()
        except Exception as exc:
            raise UsageError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
        x, y = _pair(obj, f"what {spec}() returned", limit)
    else:
        raise UsageError(f"--data {spec}: not a folder, a file, or MODULE:FUNCTION")
    if x.ndim < 2 or len(x) == 0:
        raise UsageError(f"--data {spec}: expected a batch of inputs (N, ...), got shape {tuple(x.shape)}")
    if limit is not None and len(x) > limit:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[pick], None if y is None else y[pick]
    return x, y
