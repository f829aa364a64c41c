"""Data for the pipeline: CIFAR-10/100 from the standard python-pickle archives, a built-in
synthetic dataset, the standard augmentation done in torch, and a deterministic batch loader.

Images are kept in memory as ``uint8 [N, 3, 32, 32]``; batches come out normalised float32.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["ImageSet", "DataFolderError", "load_cifar", "synthetic_dataset", "augment",
           "BatchLoader", "CIFAR_FILES", "SYNTHETIC_CLASSES"]

# Files of the standard archives (https://www.cs.toronto.edu/~kriz/cifar.html), as extracted.
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class DataFolderError(RuntimeError):
    """A dataset folder is missing, incomplete or corrupt."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return self.labels.numel()


def _find_archive_dir(root: str, subdir: str, files) -> str:
    for candidate in (os.path.join(root, subdir), root):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in files):
            return candidate
    raise DataFolderError(
        f"{root!r} holds no extracted {subdir!r} archive: expected the files {', '.join(files)} "
        f"in {os.path.join(root, subdir)!r} or in {root!r} itself. Download and extract the python "
        f"version of the archive there (this program never downloads).")


def _read_batch(path: str, label_key: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[label_key]
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as exc:  # any unreadable, truncated or foreign pickle
        raise DataFolderError(f"corrupt CIFAR batch file {path!r}: {type(exc).__name__}: {exc}. "
                              f"Re-extract the archive.") from None
    if images.shape[0] != labels.numel():
        raise DataFolderError(f"corrupt CIFAR batch file {path!r}: {images.shape[0]} images but "
                              f"{labels.numel()} labels")
    return images, labels


def load_cifar(name: str, root: str) -> Tuple[ImageSet, ImageSet]:
    """(train, test) of ``"cifar10"`` or ``"cifar100"`` from a local folder; never downloads."""
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose from {sorted(CIFAR_FILES)}")
    subdir, train_files, test_files, label_key, classes = CIFAR_FILES[name]
    folder = _find_archive_dir(root, subdir, train_files + test_files)
    splits = []
    for files in (train_files, test_files):
        parts = [_read_batch(os.path.join(folder, f), label_key) for f in files]
        labels = torch.cat([p[1] for p in parts])
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise DataFolderError(f"labels in {folder!r} fall outside [0, {classes}): not a {name} archive")
        splits.append(ImageSet(torch.cat([p[0] for p in parts]), labels, classes))
    return splits[0], splits[1]


# Synthetic classes: (texture, shape) conjunctions, so no single cue identifies a class.
SYNTHETIC_CLASSES = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 0), (4, 0), (4, 2)]
_TEXTURES = [(0.0, 3.0), (math.pi / 4, 3.0), (math.pi / 2, 3.0), (0.0, 5.5), (math.pi / 4, 5.5)]  # (angle, cycles)


def _grating(angle, cycles, phase, xx, yy):
    a, c, p = (t.view(-1, 1, 1) for t in (angle, cycles, phase))
    return torch.sin(math.pi * c * (xx * torch.cos(a) + yy * torch.sin(a)) + p)


def _shape_mask(shape, cx, cy, r, xx, yy):
    dx, dy = xx - cx.view(-1, 1, 1), yy - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    dist, box = (dx ** 2 + dy ** 2).sqrt(), torch.maximum(dx.abs(), dy.abs())
    masks = torch.stack([dist < r, box < 0.8 * r, (dist - 0.7 * r).abs() < 0.3 * r,
                         ((dx.abs() < 0.3 * r) | (dy.abs() < 0.3 * r)) & (box < r)], 1)
    return masks[torch.arange(shape.numel()), shape].float()


def synthetic_dataset(num_images: int, seed: int, noise: float = 0.15) -> ImageSet:
    """Procedural, class-structured 32×32 images, a pure function of ``(num_images, seed)``.

    Class c is a conjunction (texture, shape) from :data:`SYNTHETIC_CLASSES`: an oriented
    grating of the class's angle and frequency fills a disc / square / ring / cross placed at a
    random position and size, over a distractor grating of another texture, with random phase,
    orientation jitter, random colours and pixel noise. Texture and shape are each shared by two
    or three classes, so a network must combine them.
    """
    g = torch.Generator().manual_seed(int(seed))
    n = int(num_images)
    labels = torch.randint(len(SYNTHETIC_CLASSES), (n,), generator=g)
    spec = torch.tensor(SYNTHETIC_CLASSES)[labels]
    textures = torch.tensor(_TEXTURES)
    texture, shape = spec[:, 0], spec[:, 1]
    distractor = (texture + torch.randint(1, len(_TEXTURES), (n,), generator=g)) % len(_TEXTURES)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731  (uniform draws from the one generator)
    axis = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    fg = _grating(textures[texture, 0] + 0.2 * (u(n) - 0.5), textures[texture, 1] * (0.9 + 0.2 * u(n)),
                  2 * math.pi * u(n), xx, yy)
    bg = _grating(textures[distractor, 0] + 0.2 * (u(n) - 0.5), textures[distractor, 1] * (0.9 + 0.2 * u(n)),
                  2 * math.pi * u(n), xx, yy)
    mask = _shape_mask(shape, 0.8 * (u(n) - 0.5), 0.8 * (u(n) - 0.5), 0.35 + 0.3 * u(n), xx, yy)
    fg_colour, bg_colour = u(n, 3, 1, 1), u(n, 3, 1, 1)
    contrast = (0.5 + 0.5 * u(n, 1, 1, 1))
    image = (mask.unsqueeze(1) * fg.unsqueeze(1) * fg_colour * contrast
             + (1 - mask.unsqueeze(1)) * 0.6 * bg.unsqueeze(1) * bg_colour * contrast)
    image = 0.5 + 0.45 * image + noise * torch.randn(n, 3, 32, 32, generator=g) * 0.5
    return ImageSet((image.clamp(0, 1) * 255).round().to(torch.uint8), labels, len(SYNTHETIC_CLASSES))


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``uint8`` images, scaled to [0, 1]."""
    x = images.float().div_(255).transpose(0, 1).reshape(3, -1)
    return x.mean(1), x.std(1)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a float batch ``[B, C, H, W]``: ``pad``-px reflect padding,
    a random crop back to H×W and a random horizontal flip, all drawn from ``generator``."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Deterministic batches of an :class:`ImageSet`: a pure function of ``(seed, epoch, step)``.

    The order of epoch e comes from a generator seeded with ``(seed, e)``; the augmentation of step
    s from one seeded with ``(seed, e, s)``. So an interrupted run resumes mid-epoch exactly by
    asking for ``batches(epoch, start_step)``. Under DDP (``world > 1``) every rank builds the same
    global batch and keeps rows ``rank::world`` of it, so the global batches do not depend on the
    number of processes.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, train: bool, seed: int = 0,
                 mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"global batch size {batch_size} is not divisible by the {world} processes")
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, int(seed)
        self.rank, self.world = rank, world
        if mean is None or std is None:
            mean, std = channel_stats(data.images)
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        if train and len(data) < batch_size:
            raise ValueError(f"training set of {len(data)} images is smaller than one batch ({batch_size})")

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def batches(self, epoch: int = 0, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        if self.train:  # drop the last partial batch: fixed steps per epoch, BN never sees a batch of 1
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.data.images[index].float().div_(255)
            if self.train:
                g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_033 + step)
                x = augment(x, g)
            x = (x - self.mean) / self.std
            y = self.data.labels[index]
            yield x[self.rank::self.world], y[self.rank::self.world]
