"""Checkpoints that resume exactly: weights, optimiser, scheduler, every RNG, position in the run.

The data order and augmentation are functions of ``(seed, epoch, step)`` (see
:class:`mhgd_fast.training.data.BatchLoader`), so the position ``(epoch, step)`` restores them.

Each phase keeps its last two checkpoints, ``<phase>.pt`` and ``<phase>.prev.pt``. Every file
carries the sha256 of its contents (:func:`digest`) under ``"checkpoint_sha256"``, checked on
load. A write goes to a temporary file that is fsynced before it is renamed over the latest one
(which first becomes the previous one), so ``kill -9`` or a power cut at any moment leaves at
least one complete checkpoint; :func:`load_resumable` falls back to the previous one when the
latest is missing, truncated or fails its checksum.

Every file is read with ``torch.load(weights_only=True)``: only tensors, numbers, strings and
containers of them are unpickled, so a checkpoint (a resumed one, ``--teacher-checkpoint``)
cannot run code when it is loaded, whoever wrote it. A file holding any other Python object is
refused with :class:`UnsafeCheckpointError` before anything in it is executed.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
from typing import Callable, Optional, Tuple

import torch

__all__ = ["rng_state", "set_rng_state", "save_atomic", "load", "load_resumable", "previous_path", "digest",
           "CheckpointError", "UnsafeCheckpointError", "DIGEST_KEY", "KILL_ENV"]

DIGEST_KEY = "checkpoint_sha256"
# Test hook, inert unless set: "<point>[:<n>]" makes the n-th save (default: the first) after the
# variable is set SIGKILL its own process at <point>: "mid-write" (the temporary file cut to half its
# length), "before-rename" (temporary file complete) or "between-renames" (the latest renamed to the
# previous, the temporary not yet to the latest). Used by tests/test_crash_resume.py.
KILL_ENV = "MHGD_TEST_KILL_IN_SAVE"
KILL_POINTS = ("mid-write", "before-rename", "between-renames")
_saves_while_armed = 0
_SCALARS = (bool, int, float, str)  # bool first: it is an int


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or fails its integrity check."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds Python objects other than tensors and plain data; it was not loaded."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        # as a tensor and plain numbers, so the file loads with torch.load(weights_only=True)
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # numpy is optional; nothing here draws from it
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        saved = state["numpy"]
        if isinstance(saved, dict):
            saved = (saved["name"], saved["keys"].numpy().astype(numpy.uint32), saved["pos"], saved["has_gauss"],
                     saved["cached_gaussian"])
        numpy.random.set_state(saved)  # older checkpoints hold numpy's own tuple


def previous_path(path: str) -> str:
    """Where the checkpoint that ``path`` replaced is kept: ``x.pt`` → ``x.prev.pt``."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def digest(obj) -> str:
    """sha256 of a checkpoint's contents: tensors (dtype, shape, bytes), numpy arrays, numbers,
    strings, None, and lists, tuples and dicts of them, in order. It depends only on the values,
    so it is the same after a save and load; any other type is refused (a checkpoint holds plain
    data only)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'list' if isinstance(obj, list) else 'tuple'} {len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    elif obj is None:
        h.update(b"None;")
    elif isinstance(obj, _SCALARS):  # numpy floats and str subclasses count as the plain value
        kind = next(t for t in _SCALARS if isinstance(obj, t))
        text = f"{kind.__name__} {kind(obj)!r}"
        h.update(f"{len(text)}:{text}".encode())
    elif type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":  # numpy's RNG state
        h.update(f"ndarray {obj.dtype.str} {obj.shape}:".encode())
        h.update(obj.tobytes())
    else:
        raise TypeError(f"a checkpoint holds tensors, numbers, strings, lists and dicts only, got {type(obj).__name__}")


def _kill_point() -> Optional[str]:
    """Where this save is to kill its own process (test hook, see :data:`KILL_ENV`), or None."""
    global _saves_while_armed
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    point, _, n = spec.partition(":")
    if point not in KILL_POINTS:
        raise ValueError(f"{KILL_ENV}={spec!r}: the point must be one of {KILL_POINTS}")
    _saves_while_armed += 1
    return point if _saves_while_armed == int(n or 1) else None


def _fsync_dir(directory: str) -> None:
    if os.name == "posix":  # makes the renames durable; directories cannot be opened elsewhere
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` and its :func:`digest` to ``path``; the file it replaces becomes
    :func:`previous_path`. The temporary file is complete and fsynced before any rename, so a
    crash at any moment leaves the latest or the previous checkpoint whole (the only moment
    without ``path`` is between the two renames, and then the previous one is the newest)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    kill = _kill_point()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({**obj, DIGEST_KEY: digest(obj)}, f)
        f.flush()
        if kill == "mid-write":  # what a kill during the write leaves: the file's first half
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync(f.fileno())
    if kill == "before-rename":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    if kill == "between-renames":  # after the rotation (if there was a latest to rotate)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)
    _fsync_dir(directory)


def load(path: str) -> dict:
    """Load a checkpoint (``weights_only``: nothing in the file is executed) and check its sha256.
    Raises :class:`UnsafeCheckpointError` when the file holds other Python objects than tensors,
    numbers, strings and containers (their unpickling could run code), and :class:`CheckpointError`
    naming ``path`` and the reason when the file cannot be read (truncated, not a checkpoint) or
    its contents do not match the stored digest. Files without a digest (older checkpoints, a plain
    ``state_dict``) load unchecked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).strip()})") from exc
        first = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     str(exc).strip().splitlines()[0]).rstrip(".")
        raise UnsafeCheckpointError(
            f"{path} was not loaded: it holds Python objects other than tensors, numbers, strings, lists "
            f"and dicts, and unpickling them could run arbitrary code (checkpoints are read with "
            f"torch.load(weights_only=True)). torch says: {first}. A checkpoint of this pipeline or a "
            f"plain state_dict (torch.save(model.state_dict(), path)) loads; re-save other files as a "
            f"state_dict from code you trust.") from None
    except Exception as exc:  # torch reports a damaged file in many ways (zip, pickle, EOF, storage)
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).strip()})") from exc
    if isinstance(state, dict) and DIGEST_KEY in state:
        stored = state.pop(DIGEST_KEY)
        try:
            actual = digest(state)
        except TypeError as exc:
            raise CheckpointError(f"{path} holds unexpected contents ({exc})") from exc
        if actual != stored:
            raise CheckpointError(f"{path} fails its checksum (sha256 of the contents {actual[:12]}…, "
                                  f"stored {str(stored)[:12]}…): the file is corrupted")
    return state


def load_resumable(path: str, warn: Callable[[str], None], move_bad: bool = True) -> Optional[Tuple[dict, str]]:
    """The newest good checkpoint among ``path`` and :func:`previous_path` and where it was
    found, or None when neither file exists (nothing to resume). Each unusable file is reported
    through ``warn`` with its path and the reason. When the previous one is used instead, the
    damaged latest is renamed to ``<file>.corrupt`` (with ``move_bad``; kept for inspection, and so
    the next save does not rotate it into the previous slot). When files exist but none is
    usable, raises :class:`CheckpointError` and leaves them in place: the run stops (again at every
    retry) rather than silently training the phase again from its start."""
    problems, bad = [], []
    candidates = [p for p in (path, previous_path(path)) if os.path.exists(p)]
    for i, candidate in enumerate(candidates):
        try:
            state = load(candidate)
        except (CheckpointError, OSError) as exc:
            problems.append(str(exc))
            fallback = f"; falling back to {candidates[i + 1]}" if i + 1 < len(candidates) else ""
            warn(f"warning: unusable checkpoint: {exc}{fallback}")
            bad.append(candidate)
            continue
        for damaged in bad if move_bad else ():
            os.replace(damaged, damaged + ".corrupt")
            warn(f"moved the unusable {damaged} to {damaged}.corrupt")
        return state, candidate
    if problems:
        raise CheckpointError(f"no usable checkpoint for {path}: " + "; ".join(problems) +
                              ". Delete or move the damaged files to train this phase again from its start.")
    return None
