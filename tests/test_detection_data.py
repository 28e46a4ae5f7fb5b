"""Detection sources: digit-scenes (composed from scikit-learn's digits) and coco-detection (local
COCO JSON), their [data] options, and the boxes they hand the passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distillc.cli import app
from distillc.errors import SpecError
from distillc.plugin_manager import load_plugins
from distillc.plugins.detection_data import INK, Boxes, DetectionSplits, load_coco_detection, load_digit_scenes
from distillc.spec import load_spec

runner = CliRunner()
TINY = {"scenes": 40}


def scenes(seed: int = 0, image_size: int = 32, channels: int = 1, **options) -> DetectionSplits:
    return load_digit_scenes(image_size=image_size, val_fraction=0.25, seed=seed, channels=channels,
                             options={**TINY, **options})


def box_tuples(boxes: Boxes) -> list:
    return [tuple(map(tuple, boxes.image(i)[0].tolist())) for i in range(len(boxes))]


# -- digit-scenes -------------------------------------------------------------------------------


def test_digit_scenes_are_deterministic_by_seed():
    a, b, c = scenes(seed=3), scenes(seed=3), scenes(seed=4)
    assert torch.equal(a.train_x[:], b.train_x[:]) and torch.equal(a.val_x[:], b.val_x[:])
    assert box_tuples(a.train_boxes) == box_tuples(b.train_boxes)
    assert np.array_equal(a.val_boxes.labels, b.val_boxes.labels)
    assert not torch.equal(a.train_x[:], c.train_x[:])


def test_digit_scenes_shapes_splits_and_image_level_labels():
    data = scenes(image_size=32, channels=1)
    assert isinstance(data, DetectionSplits)
    assert data.train_x.shape == (30, 1, 32, 32) and data.val_x.shape == (10, 1, 32, 32)
    assert len(data.train_boxes) == 30 and len(data.val_boxes) == 10
    # A scene holds several digits: no label per image, the box classes are named apart.
    assert not data.labelled and bool((data.train_y == -1).all()) and bool((data.val_y == -1).all())
    assert data.detection_classes == [str(d) for d in range(10)]
    assert data.seen == tuple(range(8)) and data.unseen == (8, 9)
    counts = np.diff(data.val_boxes.offsets)
    assert counts.min() >= 1 and counts.max() <= 4


def test_digit_scenes_in_three_channels_repeat_the_grey_scene():
    grey, colour = scenes(channels=1), scenes(channels=3)
    assert colour.train_x.shape == (30, 3, 32, 32)
    assert torch.equal(colour.train_x[:5], grey.train_x[:5].expand(-1, 3, -1, -1))
    assert box_tuples(colour.val_boxes) == box_tuples(grey.val_boxes)


def test_digit_boxes_lie_inside_the_image_and_are_tight():
    data = scenes(image_size=48, digits_per_scene=[2, 4], digit_size=[0.2, 0.4])
    for images, boxes in ((data.val_x, data.val_boxes), (data.train_x, data.train_boxes)):
        pixels = images[:][:, 0].numpy()
        for i in range(len(boxes)):
            ink = pixels[i] > 0
            covered = np.zeros_like(ink)
            for x0, y0, x1, y1 in boxes.image(i)[0].astype(int):
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
                inside = pixels[i, y0:y1, x0:x1] >= INK - 1 / 255
                # tight: every edge row and column of the box holds ink
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                covered[y0:y1, x0:x1] = True
            if boxes is data.val_boxes:  # every class is labelled in validation: no ink outside boxes
                assert not (ink & ~covered).any()


def test_unseen_digits_never_reach_the_training_targets_but_are_labelled_in_validation():
    data = scenes(unseen=[3, 7], scenes=80)
    assert data.unseen == (3, 7)
    assert not np.isin(data.train_boxes.labels, [3, 7]).any()
    assert np.isin(data.val_boxes.labels, [3, 7]).any() and np.isin(data.val_boxes.labels, data.seen).any()
    # "unlabelled" (the default): training scenes still show unseen digits, only unboxed. Some ink
    # then lies outside every training box; "absent" draws training scenes from seen digits only.
    def unboxed_ink(d):
        pixels = d.train_x[:][:, 0].numpy()
        total = 0
        for i in range(len(d.train_boxes)):
            mask = pixels[i] > 0
            for x0, y0, x1, y1 in d.train_boxes.image(i)[0].astype(int):
                mask[y0:y1, x0:x1] = False
            total += int(mask.sum())
        return total

    assert unboxed_ink(data) > 0
    absent = scenes(unseen=[3, 7], scenes=80, unseen_in_train="absent")
    assert unboxed_ink(absent) == 0 and not np.isin(absent.train_boxes.labels, [3, 7]).any()


def test_noise_and_clutter_change_pixels_not_boxes():
    plain, busy = scenes(), scenes(noise=0.1, clutter=3)
    assert not torch.equal(plain.train_x[:], busy.train_x[:])
    assert busy.train_x[:].min() >= 0 and busy.train_x[:].max() <= 1
    assert len(busy.train_boxes.labels) > 0


@pytest.mark.parametrize("options, key", [
    ({"unseen": [10]}, "data.options.unseen"),
    ({"digits_per_scene": [3, 1]}, "data.options.digits_per_scene"),
    ({"scenes": "many"}, "data.options.scenes"),
    ({"colour": True}, "data.options.colour"),
    ({"digit_size": [0.05, 0.1]}, "data.options.digit_size"),  # 1.6 px at 32 px: too small
])
def test_bad_digit_scene_options_are_spec_errors_naming_the_key(options, key):
    with pytest.raises(SpecError) as err:
        scenes(**options)
    assert key in str(err.value)


def test_too_few_scenes_for_both_splits_is_a_spec_error():
    with pytest.raises(SpecError, match="data.options.scenes.*0 for validation"):
        load_digit_scenes(image_size=32, val_fraction=0.1, seed=0, options={"scenes": 2})


def test_validate_checks_data_options_against_the_source(tmp_path):
    spec = """
        [distillc]
        spec_version = 1
        name = "scenes"
        [data]
        source = "{source}"
        image_size = 32
        options = {options}
        [student]
        arch = "mobilenetv2"
        width = 0.35
    """
    import textwrap

    def check(source, options):
        path = tmp_path / "spec.toml"
        path.write_text(textwrap.dedent(spec.format(source=source, options=options)))
        return runner.invoke(app, ["validate", str(path)])

    assert check("digit-scenes", "{ unseen = [8, 9], scenes = 50 }").exit_code == 0
    bad = check("digit-scenes", "{ unseen = [12] }")
    assert bad.exit_code == 2 and "data.options.unseen" in bad.output
    unknown = check("digit-scenes", "{ noize = 0.1 }")
    assert unknown.exit_code == 2 and "data.options.noize" in unknown.output and "allowed:" in unknown.output
    none = check("sklearn-digits", "{ scenes = 5 }")
    assert none.exit_code == 2 and "data.options" in none.output and "takes no options" in none.output


def test_options_enter_the_data_fingerprint_and_reach_the_loader(tmp_path):
    plugins = load_plugins()
    text = ('[distillc]\nspec_version = 1\nname = "s"\n[data]\nsource = "digit-scenes"\nimage_size = 32\n'
            'options = {options}\n[student]\narch = "mobilenetv2"\n')
    prints = {}
    for options in ("{ scenes = 40 }", "{ scenes = 40, unseen = [8, 9] }", "{ scenes = 40, unseen = [1] }"):
        path = tmp_path / "spec.toml"
        path.write_text(text.format(options=options))
        spec = load_spec(path, plugins)
        prints[options] = spec.data_fingerprint(plugins)
    # defaults filled in before hashing: spelling out a default keeps the key
    assert prints["{ scenes = 40 }"] == prints["{ scenes = 40, unseen = [8, 9] }"]
    assert prints["{ scenes = 40 }"] != prints["{ scenes = 40, unseen = [1] }"]
    data = spec.load_data(plugins)
    assert data.unseen == (1,) and len(data.train_x) + len(data.val_x) == 40


# -- coco-detection -----------------------------------------------------------------------------


def write_coco(root, images, annotations, categories, name="instances.json", folder="images"):
    """Images as (file name, width, height, colour); returns the JSON's path."""
    from PIL import Image

    (root / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (file, width, height, colour) in enumerate(images):
        Image.new("RGB", (width, height), colour).save(root / folder / file)
        entries.append({"id": 100 + i, "file_name": file, "width": width, "height": height})
    doc = {"images": entries, "annotations": annotations, "categories": categories}
    (root / name).write_text(json.dumps(doc))
    return root / name


CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 7, "name": "kite"}]


def coco_set(tmp_path):
    images = [("wide.png", 80, 40, (255, 0, 0)), ("tall.png", 20, 40, (0, 255, 0)), ("square.png", 16, 16, (0, 0, 255))]
    annotations = [
        {"id": 1, "image_id": 100, "category_id": 3, "bbox": [8, 4, 40, 20], "iscrowd": 0},
        {"id": 2, "image_id": 100, "category_id": 7, "bbox": [60, 30, 30, 30], "iscrowd": 0},  # runs off the image
        {"id": 3, "image_id": 101, "category_id": 1, "bbox": [0, 0, 10, 20], "iscrowd": 1},
        {"id": 4, "image_id": 101, "category_id": 7, "bbox": [5, 10, 10, 10]},
    ]
    return write_coco(tmp_path, images, annotations, CATEGORIES)


def coco(tmp_path, **options):
    return load_coco_detection(image_size=32, val_fraction=0.34, seed=0, path=tmp_path, channels=3,
                               options={"images": "images", **options})


def all_images(data):
    """(boxes, labels, crowd) of every image, train then val, keyed by the image's pixel colour."""
    out = {}
    for images, boxes in ((data.train_x, data.train_boxes), (data.val_x, data.val_boxes)):
        for i in range(len(boxes)):
            centre = tuple(int(v) for v in (images[i][:, 16, 16] * 255).round())
            out[centre] = boxes.image(i)
    return out


def test_coco_round_trip_with_letterbox_transforms_the_boxes(tmp_path):
    coco_set(tmp_path)
    data = coco(tmp_path, val_annotations="instances.json", val_images="images")  # same file as both splits
    assert data.detection_classes == ["person", "cat", "kite"]  # ascending COCO id -> contiguous ids
    assert data.train_x.shape == (3, 3, 32, 32) and not data.labelled
    by_colour = all_images(data)
    # wide 80x40 -> 32x16, centred: offset y = 8, scale 0.4
    boxes, labels, crowd = by_colour[(255, 0, 0)]
    np.testing.assert_allclose(boxes, [[3.2, 9.6, 19.2, 17.6], [24.0, 20.0, 32.0, 24.0]], atol=1e-5)
    assert labels.tolist() == [1, 2] and not crowd.any()
    # tall 20x40 -> 16x32, offset x = 8, scale 0.8; the crowd box keeps its flag
    boxes, labels, crowd = by_colour[(0, 255, 0)]
    np.testing.assert_allclose(boxes, [[8, 0, 16, 16], [12, 8, 20, 16]], atol=1e-5)
    assert labels.tolist() == [0, 2] and crowd.tolist() == [True, False]
    # the letterbox bars are black, the picture lies where the transform put it
    wide = next(data.train_x[i] for i in range(3) if data.train_x[i][0, 16, 16] > 0.9)
    assert float(wide[:, :8].max()) == 0.0 and float(wide[:, 24:].max()) == 0.0
    assert float(wide[0, 8:24].min()) > 0.99
    assert by_colour[(0, 0, 255)][0].shape == (0, 4)  # an image without annotations is a negative


def test_coco_stretch_scales_each_axis(tmp_path):
    coco_set(tmp_path)
    data = coco(tmp_path, resize="stretch", val_annotations="instances.json")
    boxes, _, _ = all_images(data)[(255, 0, 0)]
    np.testing.assert_allclose(boxes, [[3.2, 3.2, 19.2, 19.2], [24.0, 24.0, 32.0, 32.0]], atol=1e-5)


def test_coco_split_by_val_fraction_and_unseen_categories_leave_training(tmp_path):
    coco_set(tmp_path)
    data = coco(tmp_path, unseen=["kite"])
    assert len(data.train_x) + len(data.val_x) == 3 and len(data.val_x) == 1
    assert data.unseen == (2,) and data.seen == (0, 1)
    assert 2 not in data.train_boxes.labels.tolist()
    again = coco(tmp_path, unseen=["kite"])
    assert torch.equal(data.val_x[:], again.val_x[:])


def test_coco_json_found_without_the_option(tmp_path):
    coco_set(tmp_path)
    data = load_coco_detection(image_size=32, val_fraction=0.34, seed=0, path=tmp_path,
                               options={"images": "images"})
    assert len(data.train_x) == 2


@pytest.mark.parametrize("change, words", [
    (lambda d: d.pop("categories"), ["categories: missing"]),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), ["annotations[1].bbox", "4 numbers"]),
    (lambda d: d["annotations"][0].update(category_id=99), ["annotations[0].category_id", "no category with id 99"]),
    (lambda d: d["annotations"][2].update(image_id=5), ["annotations[2].image_id", "no image with id 5"]),
    (lambda d: d["images"][0].update(file_name="missing.png"), ["images[0].file_name", "no image at"]),
    (lambda d: d["images"][1].pop("id"), ["images[1].id: missing"]),
    (lambda d: d["categories"].append({"id": 3, "name": "dog"}), ["categories[3].id", "duplicate"]),
    (lambda d: d["annotations"][0].update(iscrowd=2), ["annotations[0].iscrowd"]),
    (lambda d: d["images"][0].update(width=81), ["wide.png", "80x40", "81x40"]),
])
def test_malformed_coco_json_is_a_spec_error_naming_file_and_key(tmp_path, change, words):
    file = coco_set(tmp_path)
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc))
    with pytest.raises(SpecError) as err:
        coco(tmp_path, annotations="instances.json")
    message = str(err.value)
    assert all(w in message for w in words), message
    if "81x40" not in words:
        assert "instances.json" in message and "data.options.annotations" in message


def test_coco_not_json_and_unknown_unseen_name_are_spec_errors(tmp_path):
    file = coco_set(tmp_path)
    with pytest.raises(SpecError, match="data.options.unseen.*zebra"):
        coco(tmp_path, unseen=["zebra"])
    file.write_text("{not json")
    with pytest.raises(SpecError, match="data.options.annotations.*not a readable JSON"):
        coco(tmp_path)


def test_boxes_without_drops_classes_and_keeps_the_image_count():
    boxes = Boxes.from_images([([[0, 0, 1, 1], [1, 1, 2, 2]], [0, 1]), ([], []), ([[2, 2, 3, 3]], [1])])
    kept = boxes.without([1])
    assert len(kept) == 3 and kept.offsets.tolist() == [0, 1, 1, 1] and kept.labels.tolist() == [0]
    assert boxes.select([2, 0]).labels.tolist() == [1, 0, 1]
