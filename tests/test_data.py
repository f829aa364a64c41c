"""CIFAR pickle reading (and its failures), the synthetic dataset, augmentation, batching."""
import os
import pickle

import numpy as np
import pytest
import torch

from mhgd_fast.training.data import (CIFAR_FILES, BatchLoader, DataFolderError, ImageSet, augment, load_cifar,
                            synthetic_dataset)


def write_fake_cifar(root, name, per_file=6, seed=0):
    """A miniature archive in the real layout: pickled dicts with bytes keys, uint8 rows of 3072."""
    subdir, train_files, test_files, label_key, classes = CIFAR_FILES[name]
    folder = os.path.join(root, subdir)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    written = {}
    for f in train_files + test_files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, per_file).tolist()
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump({b"data": data, label_key: labels, b"filenames": [b"x"] * per_file}, fh)
        written[f] = (data, labels)
    return folder, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_the_standard_archive(tmp_path, name):
    folder, written = write_fake_cifar(str(tmp_path), name)
    _, train_files, test_files, _, classes = CIFAR_FILES[name]
    for root in (str(tmp_path), folder):  # the parent folder or the archive folder itself
        train, test = load_cifar(name, root)
        assert len(train) == 6 * len(train_files) and len(test) == 6 * len(test_files)
        assert train.num_classes == classes and train.images.dtype == torch.uint8
        data, labels = written[train_files[-1]]
        # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32×32
        assert torch.equal(train.images[-6:], torch.from_numpy(data).reshape(6, 3, 32, 32))
        assert train.images[-1, 1, 2, 3] == data[-1, 1024 + 2 * 32 + 3]
        assert train.labels[-6:].tolist() == labels


def test_missing_folder_names_the_expected_files(tmp_path):
    with pytest.raises(DataFolderError, match="train, test") as info:
        load_cifar("cifar100", str(tmp_path / "nowhere"))
    assert "cifar-100-python" in str(info.value)


def test_incomplete_folder_fails(tmp_path):
    folder, _ = write_fake_cifar(str(tmp_path), "cifar10")
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(DataFolderError, match="data_batch_3"):
        load_cifar("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_keys", "label_range", "count_mismatch"])
def test_corrupt_files_fail_naming_the_file(tmp_path, damage):
    folder, written = write_fake_cifar(str(tmp_path), "cifar100")
    path = os.path.join(folder, "test")
    if damage == "truncate":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"not a pickle at all")
    elif damage == "wrong_keys":
        pickle.dump({b"pixels": 1}, open(path, "wb"))
    elif damage == "label_range":
        data, _ = written["test"]
        pickle.dump({b"data": data, b"fine_labels": [100] * 6}, open(path, "wb"))
    else:
        data, labels = written["test"]
        pickle.dump({b"data": data, b"fine_labels": labels[:5]}, open(path, "wb"))
    with pytest.raises(DataFolderError) as info:
        load_cifar("cifar100", str(tmp_path))
    assert "test" in str(info.value) or folder in str(info.value)


def test_synthetic_is_deterministic_by_seed():
    a, b, c = synthetic_dataset(97, seed=3), synthetic_dataset(97, seed=3), synthetic_dataset(97, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (97, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.num_classes == 10 and a.labels.min() >= 0 and a.labels.max() < 10


def test_synthetic_classes_are_balanced_and_not_trivial():
    data = synthetic_dataset(2000, seed=0)
    counts = torch.bincount(data.labels, minlength=10)
    assert counts.min() > 150  # roughly 200 each
    # no single colour statistic separates the classes: per-class mean colours are close together
    means = torch.stack([data.images[data.labels == k].float().mean((0, 2, 3)) for k in range(10)])
    assert float(means.std(0).max()) < 3.0
    # a nearest-class-mean classifier on raw pixels is far from perfect
    x = data.images.float().flatten(1)
    centroids = torch.stack([x[data.labels == k].mean(0) for k in range(10)])
    accuracy = float((torch.cdist(x, centroids).argmin(1) == data.labels).float().mean())
    assert accuracy < 0.5


def test_augment_crops_flips_against_loops():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 7, 9)
    out = augment(x, g, pad=2)
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 5, (5,), generator=g), torch.randint(0, 5, (5,), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(5):
        crop = padded[b, :, dy[b]:dy[b] + 7, dx[b]:dx[b] + 9]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)


def _tiny_set(n=23):
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 3, 3)


def test_batches_are_a_function_of_seed_epoch_step():
    data = _tiny_set()
    loader = BatchLoader(data, 4, train=True, seed=1)
    assert len(loader) == 5  # the partial batch is dropped
    full = list(loader.batches(epoch=2))
    resumed = list(loader.batches(epoch=2, start_step=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))
    other_epoch = list(loader.batches(epoch=3))
    assert not torch.equal(full[0][0], other_epoch[0][0])
    seen = torch.cat([y for _, y in full])
    assert seen.numel() == 20


def test_ranks_split_the_same_global_batch():
    data = _tiny_set()
    single = list(BatchLoader(data, 6, train=True, seed=2).batches(1))
    ranks = [list(BatchLoader(data, 6, train=True, seed=2, rank=r, world=2).batches(1)) for r in range(2)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(x[0::2], ranks[0][step][0]) and torch.equal(x[1::2], ranks[1][step][0])
        assert torch.equal(y[1::2], ranks[1][step][1])
    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(data, 5, train=True, world=2)


def test_eval_batches_cover_everything_in_order_and_normalise():
    data = _tiny_set()
    loader = BatchLoader(data, 10, train=False)
    xs, ys = zip(*loader.batches())
    assert torch.equal(torch.cat(ys), data.labels)
    x = torch.cat(xs)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-3)
