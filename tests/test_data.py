"""Specifications of the built-in datasets (plugins/data.py) and augmentations (augment.py)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from distillc.errors import SpecError
from distillc.plugins.augment import Augment, apply_patch_mask, random_patch_mask
from distillc.plugins.data import (DATASETS, DataSplits, fingerprint, load_cifar, load_dataset,
                                   load_image_folder, load_npz, load_sklearn_digits)


def digits(seed: int = 0, **kwargs) -> DataSplits:
    options = {"image_size": 16, "val_fraction": 0.2, "seed": seed}
    options.update(kwargs)
    return load_sklearn_digits(**options)


# --------------------------------------------------------------------------- sklearn-digits


def test_digits_shapes_dtypes_and_value_range():
    data = digits()
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.shape[1:] == (3, 16, 16) and data.image_shape == (3, 16, 16)
    assert len(data.train_x) + len(data.val_x) == 1797
    assert len(data.val_x) == pytest.approx(0.2 * 1797, abs=10)
    assert data.train_x.min() >= 0.0 and data.train_x.max() <= 1.0
    assert data.train_x.max() > 0.9  # 16/16 ink survives the resize
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert data.name == "sklearn-digits"
    torch.testing.assert_close(data.train_x[:, 0], data.train_x[:, 2])  # replicated gray


def test_digits_at_native_size_are_the_raw_values_over_16():
    from sklearn.datasets import load_digits

    data = load_sklearn_digits(image_size=8, val_fraction=0.0, seed=0, channels=1)
    raw = torch.from_numpy(load_digits().images).float() / 16
    torch.testing.assert_close(data.train_x[:, 0], raw)


def test_digits_split_is_stratified():
    data = digits()
    counts = torch.bincount(data.val_y, minlength=10)
    totals = counts + torch.bincount(data.train_y, minlength=10)
    assert torch.all((counts - 0.2 * totals).abs() <= 1)


def test_same_seed_gives_the_same_split():
    first, second = digits(seed=3), digits(seed=3)
    torch.testing.assert_close(first.val_x, second.val_x)
    assert torch.equal(first.train_y, second.train_y)


def test_different_seed_gives_a_different_split():
    first, second = digits(seed=0), digits(seed=1)
    assert first.val_x.shape == second.val_x.shape
    assert not torch.equal(first.val_x, second.val_x)


def test_digits_take_no_path_and_bad_fraction_names_the_key(tmp_path):
    with pytest.raises(SpecError, match="data.path"):
        digits(path=tmp_path)
    with pytest.raises(SpecError, match="data.val_fraction"):
        digits(val_fraction=1.0)


def test_unknown_source_lists_the_valid_ones():
    assert set(DATASETS) == {"sklearn-digits", "npz", "image-folder", "cifar", "webdataset"}
    with pytest.raises(SpecError, match="sklearn-digits"):
        load_dataset("imagenet", image_size=8, val_fraction=0.2, seed=0)


# --------------------------------------------------------------------------- npz


def test_npz_channels_last_uint8_with_labels(tmp_path):
    # Image i is filled with the value i and labelled i // 10, so pairs can be checked.
    x = np.broadcast_to(np.arange(40, dtype=np.uint8)[:, None, None, None], (40, 12, 12, 3))
    y = np.arange(40) // 10
    np.savez(tmp_path / "data.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d"]))

    data = load_npz(image_size=12, val_fraction=0.25, seed=0, path=tmp_path / "data.npz")

    assert data.train_x.shape == (30, 3, 12, 12) and data.val_x.shape == (10, 3, 12, 12)
    assert data.num_classes == 4 and data.class_names == ["a", "b", "c", "d"]
    for lazy, labels in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        index = (lazy[:, 1, 5, 7] * 255).round().long()
        assert torch.equal(labels, index // 10)
        images = lazy[:]  # the images stay in a memory-mapped file until read
        assert torch.allclose(images, images[:, :1, :1, :1].expand_as(images))
    # 2.5 images per class: two classes give 3, two give 2, adding up to 10.
    assert sorted(torch.bincount(data.val_y).tolist()) == [2, 2, 3, 3]


def test_npz_unlabelled_channels_first_float(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "u.npz", x=x)
    data = load_npz(image_size=12, val_fraction=0.2, seed=0, path=tmp_path / "u.npz")
    assert data.train_x.shape == (8, 3, 12, 12)
    assert data.num_classes == 0 and data.class_names == [] and not data.labelled
    assert torch.all(data.train_y == -1) and torch.all(data.val_y == -1)


def test_npz_with_its_own_validation_set(tmp_path):
    np.savez(tmp_path / "v.npz", x=np.zeros((6, 8, 8), np.uint8), y=np.arange(6) % 2,
             x_val=np.full((3, 8, 8), 255, np.uint8), y_val=np.array([0, 1, 2]))
    data = load_npz(image_size=8, val_fraction=0.5, seed=0, path=tmp_path / "v.npz", channels=1)
    assert len(data.train_x) == 6 and len(data.val_x) == 3
    assert torch.all(data.val_x[:] == 1.0) and torch.all(data.train_x[:] == 0.0)
    assert data.num_classes == 3


def test_npz_errors_are_spec_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(SpecError, match="no array 'x'"):
        load_npz(image_size=4, val_fraction=0.0, seed=0, path=tmp_path / "nox.npz")
    np.savez(tmp_path / "range.npz", x=np.full((2, 4, 4), 7.0))
    with pytest.raises(SpecError, match=r"\[0, 1\]"):
        load_npz(image_size=4, val_fraction=0.0, seed=0, path=tmp_path / "range.npz")
    np.savez(tmp_path / "count.npz", x=np.zeros((2, 4, 4)), y=np.zeros(3, np.int64))
    with pytest.raises(SpecError, match="3 labels for 2 images"):
        load_npz(image_size=4, val_fraction=0.0, seed=0, path=tmp_path / "count.npz")
    with pytest.raises(SpecError, match="not a file"):
        load_npz(image_size=4, val_fraction=0.0, seed=0, path=tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SpecError, match="not a readable"):
        load_npz(image_size=4, val_fraction=0.0, seed=0, path=tmp_path / "junk.npz")


# --------------------------------------------------------------------------- image-folder


def write_image(path, size, color):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_image_folder_reads_sorted_classes_and_resizes(tmp_path):
    for name, color in (("zebra", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(5):
            write_image(tmp_path / name / f"{i}.png", (20 + i, 10), color)
    write_image(tmp_path / "ant" / "extra.jpg", (8, 8), (0, 0, 255))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")

    data = load_image_folder(image_size=8, val_fraction=0.0, seed=0, path=tmp_path)

    assert data.class_names == ["ant", "zebra"] and data.num_classes == 2
    assert data.train_x.shape == (11, 3, 8, 8) and len(data.val_x) == 0
    ants = data.train_x[data.train_y == 0]
    assert len(ants) == 6
    assert torch.allclose(ants[:, 2], torch.ones(1), atol=0.02)  # blue channel
    assert torch.allclose(data.train_x[data.train_y == 1][:, 0], torch.ones(1))  # red


def test_image_folder_with_train_and_val_folders(tmp_path):
    for split, count in (("train", 3), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                write_image(tmp_path / split / name / f"{i}.png", (4, 4), (9, 9, 9))
    data = load_image_folder(image_size=4, val_fraction=0.5, seed=0, path=tmp_path, channels=1)
    assert data.train_x.shape == (6, 1, 4, 4) and data.val_x.shape == (2, 1, 4, 4)
    assert data.val_y.tolist() == [0, 1]


def test_image_folder_errors_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="no class folders"):
        load_image_folder(image_size=4, val_fraction=0.0, seed=0, path=tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(SpecError, match="no images found"):
        load_image_folder(image_size=4, val_fraction=0.0, seed=0, path=tmp_path)
    (tmp_path / "cls" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SpecError, match="broken.png"):
        load_image_folder(image_size=4, val_fraction=0.0, seed=0, path=tmp_path)


# --------------------------------------------------------------------------- cifar


def write_cifar10(folder, batches=2, per_batch=4, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]
    for name in names:
        batch = {b"batch_label": name.encode(),
                 b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))


def test_cifar10_layout_uses_the_test_batch_for_validation(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_cifar(image_size=32, val_fraction=0.5, seed=0, path=tmp_path)
    assert data.train_x.shape == (8, 3, 32, 32) and data.val_x.shape == (4, 3, 32, 32)
    assert data.num_classes == 10 and data.class_names[3] == "class3"
    assert data.name == "cifar10"
    test = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    expected = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(data.val_x[:], expected)
    assert data.val_y.tolist() == test[b"labels"]


def test_cifar100_layout_with_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("train", 5), ("test", 2)):
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    data = load_cifar(image_size=16, val_fraction=0.2, seed=0, path=tmp_path, channels=1)
    assert data.train_x.shape == (5, 1, 16, 16) and data.val_x.shape == (2, 1, 16, 16)
    assert data.num_classes == 5 and data.name == "cifar100"


class RunsACommand:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_unpickler_refuses_anything_but_arrays(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
            b"payload": RunsACommand(marker)}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(evil))
    with pytest.raises(SpecError, match="refusing to load .*system"):
        load_cifar(image_size=32, val_fraction=0.0, seed=0, path=tmp_path)
    assert not marker.exists()


def test_cifar_bad_folder_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="not a CIFAR folder"):
        load_cifar(image_size=32, val_fraction=0.0, seed=0, path=tmp_path)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_config_and_files(tmp_path):
    write_cifar10(tmp_path)
    args = {"image_size": 32, "val_fraction": 0.1, "seed": 0, "path": tmp_path}
    first = fingerprint("cifar", **args)
    assert first == fingerprint("cifar", **args) and len(first) == 64
    assert fingerprint("cifar", **dict(args, seed=1)) != first
    with open(tmp_path / "test_batch", "ab") as handle:
        handle.write(b"\0")
    assert fingerprint("cifar", **args) != first
    assert fingerprint("sklearn-digits", image_size=8, val_fraction=0.2, seed=0) == \
        fingerprint("sklearn-digits", image_size=8, val_fraction=0.2, seed=0)


# --------------------------------------------------------------------------- augment


def batch():
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_strength_zero_is_the_identity():
    x = batch()
    assert torch.equal(Augment(strength=0.0, flip=True)(x, torch.Generator().manual_seed(1)), x)


def test_augment_is_deterministic_for_a_seeded_generator():
    augment, x = Augment.strong(), batch()
    first = augment(x, torch.Generator().manual_seed(7))
    again = augment(x, torch.Generator().manual_seed(7))
    other = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("strength", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shape_dtype_and_range(strength, channels):
    x = torch.rand(4, channels, 12, 12, generator=torch.Generator().manual_seed(0))
    out = Augment(strength=strength, flip=False)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)


def test_geometric_then_appearance_is_the_augmentation_and_moves_stacked_channels_alike():
    augment, x = Augment(strength=0.8, flip=True), batch()
    whole = augment(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    moved = augment.geometric(torch.cat([x, x], dim=1), gen)
    assert torch.equal(moved[:, :3], moved[:, 3:])
    assert torch.allclose(augment.appearance(moved[:, :3], gen), whole, atol=1e-6)
    assert Augment(strength=0.0).geometric(x) is x and Augment(strength=0.0).appearance(x) is x


def test_weak_changes_images_less_than_strong():
    x = batch()
    weak = (Augment.weak()(x, torch.Generator().manual_seed(0)) - x).abs().mean()
    strong = (Augment.strong()(x, torch.Generator().manual_seed(0)) - x).abs().mean()
    assert weak < strong
    assert Augment.weak().with_strength(0.0)(x) is x


def test_strength_out_of_range_is_a_spec_error():
    with pytest.raises(SpecError, match="strength"):
        Augment(strength=1.5)


def test_random_patch_mask_keeps_an_exact_number_per_row():
    mask = random_patch_mask(5, 4, 0.25, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (5, 16)
    assert mask.sum(1).tolist() == [4] * 5
    again = random_patch_mask(5, 4, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_apply_patch_mask_blanks_dropped_patches():
    x = torch.ones(1, 2, 4, 4)
    keep = torch.tensor([[True, False, False, True]])
    out = apply_patch_mask(x, keep)
    assert out[0, :, :2, :2].eq(1).all() and out[0, :, :2, 2:].eq(0).all()
    assert out[0, :, 2:, :2].eq(0).all() and out[0, :, 2:, 2:].eq(1).all()
