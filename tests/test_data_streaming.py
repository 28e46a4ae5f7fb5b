"""Data that streams: memory-mapped images read lazily, WebDataset shards, unlabelled folders."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap

import numpy as np
import pytest
import torch

from distillc.errors import SpecError
from distillc.plugins.data import load_image_folder, load_npz, load_webdataset
from distillc.plugins.image_store import ImageArray
from distillc.progress import SilentProgress
from distillc.run import compile_spec

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _encoded(colour, fmt: str, size=(12, 10)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_shards(folder, per_shard=(5, 4), labelled=True) -> None:
    """Shards whose sample i has colour i % 3 and (when labelled) label i % 3."""
    i = 0
    for s, count in enumerate(per_shard):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for _ in range(count):
                files = {"jpg" if i % 2 else "png": _encoded(COLOURS[i % 3], "JPEG" if i % 2 else "PNG")}
                if labelled:
                    files["cls"] = str(i % 3).encode()
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"sample{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1


def test_webdataset_shards_decode_in_order_with_their_labels(tmp_path):
    _write_shards(tmp_path)
    data = load_webdataset(image_size=8, val_fraction=0.0, seed=0, path=tmp_path)
    assert isinstance(data.train_x, ImageArray) and data.train_x.shape == (9, 3, 8, 8)
    assert data.num_classes == 3 and data.train_y.tolist() == [i % 3 for i in range(9)]
    images = data.train_x[:]
    for i in range(9):  # the colour of sample i is channel i % 3 (JPEG is close, PNG exact)
        means = images[i].mean(dim=(1, 2))
        assert int(means.argmax()) == i % 3 and float(means.max()) > 0.9, (i, means)


def test_unlabelled_webdataset_and_a_single_shard(tmp_path):
    _write_shards(tmp_path, per_shard=(6,), labelled=False)
    data = load_webdataset(image_size=8, val_fraction=0.5, seed=0, path=tmp_path / "shard-000.tar")
    assert not data.labelled and len(data.train_x) == 3 and len(data.val_x) == 3
    assert data.train_y.tolist() == [-1] * 3


def test_webdataset_refuses_partly_labelled_shards_and_non_shards(tmp_path):
    _write_shards(tmp_path, per_shard=(3,))
    with tarfile.open(tmp_path / "shard-001.tar", "w") as tar:
        data = _encoded((0, 0, 0), "PNG")
        info = tarfile.TarInfo("extra.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SpecError, match="1 of 4 samples have no .cls label"):
        load_webdataset(image_size=8, val_fraction=0.0, seed=0, path=tmp_path)
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(SpecError, match=r"cannot read the shard .*notes.txt': not a readable tar archive \(") as caught:
        load_webdataset(image_size=8, val_fraction=0.0, seed=0, path=tmp_path / "notes.txt")
    assert "\n" not in str(caught.value)
    with pytest.raises(SpecError, match="not a .tar shard or a folder"):
        load_webdataset(image_size=8, val_fraction=0.0, seed=0, path=tmp_path / "more")


def test_an_unlabelled_image_folder(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (9, 9), COLOURS[i % 3]).save(tmp_path / f"{i}.png")
    data = load_image_folder(image_size=6, val_fraction=0.25, seed=0, path=tmp_path)
    assert not data.labelled and data.train_x.shape == (3, 3, 6, 6) and len(data.val_x) == 1
    assert isinstance(data.train_x, ImageArray)


def test_a_npy_array_is_memory_mapped_in_place(tmp_path):
    x = (np.arange(20 * 3 * 8 * 8) % 256).astype(np.uint8).reshape(20, 3, 8, 8)
    np.save(tmp_path / "x.npy", x)
    data = load_npz(image_size=8, val_fraction=0.25, seed=0, path=tmp_path / "x.npy")
    assert isinstance(data.train_x.source, np.memmap)  # no copy in RAM
    rows = np.sort(np.concatenate([data.train_x.index, data.val_x.index]))
    assert rows.tolist() == list(range(20))
    torch.testing.assert_close(data.train_x[:], torch.from_numpy(x[data.train_x.index]).float() / 255)


def test_an_image_array_indexes_like_a_tensor(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    memmap = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=x.shape)
    memmap[:] = x
    index = np.array([9, 2, 4, 7, 0])
    lazy = ImageArray(memmap, 1 / 255, image_size=4, channels=3, index=index)
    eager = torch.from_numpy(x[index]).float().div(255).expand(-1, 3, -1, -1)
    assert lazy.shape == eager.shape and len(lazy) == 5
    for key in (slice(None), slice(1, 4), slice(None, None, 2), torch.tensor([4, 0, 0]), np.array([-1, 1]),
                torch.tensor([True, False, True, False, True])):
        torch.testing.assert_close(lazy[key], eager[key])
    torch.testing.assert_close(lazy[3], eager[3])
    torch.testing.assert_close(lazy[:, 0, 1, 2], eager[:, 0, 1, 2])
    with pytest.raises(IndexError):
        lazy[torch.tensor([5])]


def test_a_compile_trains_from_webdataset_shards(write_spec, tmp_path):
    """The training loops and the teacher-target cache read the memory-mapped images batch by batch."""
    _write_shards(tmp_path, per_shard=(12, 12))
    path = write_spec(textwrap.dedent("""
        [distillc]
        spec_version = 1
        name = "shards"

        [data]
        source = "webdataset"
        path = "."
        image_size = 8
        val_fraction = 0.25
        channels = 1

        [[teachers]]
        name = "vit"
        arch = "vit_tiny_patch4"
        depth = 1
        train = { epochs = 1, batch_size = 8 }

        [student]
        arch = "mobilenetv2"
        width = 0.35
        last_channels = 16

        [[passes]]
        use = "distill.feature"
        teacher = "vit"
        epochs = 1
        batch_size = 8
        projector_hidden = 0
        """))
    result = compile_spec(path, progress=SilentProgress(), until="distill.feature")
    assert result.ran == ["teacher:vit", "student", "distill.feature"]
    metrics = json.loads((tmp_path / "build" / "shards" / "report.json").read_text())["metrics"]
    assert metrics["distill.feature"]["loss"] > 0
