"""detect.open-vocab and eval.detection: cell targets, crops, the region basis, both decoders, the pass
end to end on tiny digit scenes, and a teacher trained on its own data (``train.data``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distillc.errors import PassError, SpecError
from distillc.passes.detect import decode
from distillc.passes.detect.openvocab import assign_cells, crops, quantize_rows, region_basis
from distillc.plugin_manager import load_plugins
from distillc.plugins.detection_data import Boxes
from distillc.plugins.models.detection_head import EMBED
from distillc.run import compile_spec
from distillc.spec import load_spec

# -- decoders -------------------------------------------------------------------------------------


def _map(grid: int, embed: int) -> np.ndarray:
    """A float map with every cell background (objectness logit -10)."""
    out = np.zeros((1, EMBED + embed, grid, grid))
    out[0, 0] = -10.0
    return out


def _object(out: np.ndarray, row: int, col: int, cx: float, cy: float, w: float, h: float, emb: list[float]) -> None:
    out[0, 0, row, col] = 10.0
    out[0, 1:5, row, col] = [cx, cy, math.log(w), math.log(h)]
    out[0, EMBED:EMBED + len(emb), row, col] = emb


def test_float_decode_places_the_box_and_picks_the_closest_class():
    rows = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = _map(4, 2)
    _object(out, 1, 2, 0.5, 0.25, 2.0, 1.0, [0.1, 1.0])  # cell (1, 2), stride 8
    [det] = decode.decode_float(out, rows, 2, stride=8, image_size=32, score_threshold=0.5, iou=0.5, max_out=10)
    assert det.labels.tolist() == [1]
    # centre (2.5 cells, 1.25 cells) * 8 = (20, 10); size (16, 8)
    np.testing.assert_allclose(det.boxes[0], [12.0, 6.0, 28.0, 14.0], atol=1e-9)
    assert det.scores[0] == pytest.approx(1 / (1 + math.exp(-10)) * (1.0 / math.hypot(0.1, 1.0)))
    # dim 1: only the first coordinate counts, so class 0 wins
    [det1] = decode.decode_float(out, rows, 1, stride=8, image_size=32, score_threshold=0.5, iou=0.5, max_out=10)
    assert det1.labels.tolist() == [0]


def test_nms_suppresses_overlaps_of_one_class_only_and_max_out_caps():
    rows = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = _map(4, 2)
    _object(out, 1, 1, 0.5, 0.5, 2.0, 2.0, [1.0, 0.0])
    _object(out, 1, 2, -0.3, 0.5, 2.0, 2.0, [1.0, 0.2])   # overlaps the first, same class, lower cosine
    _object(out, 2, 1, 0.5, 0.0, 2.0, 2.0, [0.0, 1.0])   # overlaps, other class: kept
    [det] = decode.decode_float(out, rows, 2, stride=8, image_size=32, score_threshold=0.1, iou=0.5, max_out=10)
    assert sorted(det.labels.tolist()) == [0, 1]
    [capped] = decode.decode_float(out, rows, 2, stride=8, image_size=32, score_threshold=0.1, iou=0.5, max_out=1)
    assert len(capped.labels) == 1 and capped.labels[0] == 0
    [loose] = decode.decode_float(out, rows, 2, stride=8, image_size=32, score_threshold=0.1, iou=0.99, max_out=10)
    assert len(loose.labels) == 3


def test_cosine_q15_and_isqrt_are_exact_integers():
    assert decode.cosine_q15(0, 4, 4) == 0 and decode.cosine_q15(-3, 4, 4) == 0
    assert decode.cosine_q15(5, 25, 1) == 32767  # cosine 1, capped at Q15's largest value
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.integers(-128, 128, 32)
        p = rng.integers(-127, 128, 32)
        dot, ve, pe = int(v @ p), int(v @ v), int(p @ p)
        got = decode.cosine_q15(dot, ve, pe)
        want = max(0.0, dot / math.sqrt(ve * pe)) if ve and pe else 0.0
        assert abs(got / 32768 - want) < 2e-4


def test_integer_decode_agrees_with_the_float_decode_of_the_same_int8_map():
    rng = np.random.default_rng(1)
    grid, embed, dims = 6, 8, [4, 8]
    scale, zp = 0.05, 3
    q = rng.integers(-128, 128, (3, EMBED + embed, grid, grid)).astype(np.int8)
    q[:, 0] = np.where(rng.random((3, grid, grid)) < 0.15, 120, -120)  # a few confident cells
    rows = rng.integers(-127, 128, (5, embed)).astype(np.int8)
    real = (q.astype(np.float64) - zp) * np.float32(scale)
    for dim in dims:
        ints = decode.decode_int8(q, rows, dims, dim, zero_point=zp, scale=scale, stride=8, image_size=48,
                                  threshold_q=int(0.2 * 32768), iou=0.5, max_out=20)
        floats = decode.decode_float(real, rows.astype(np.float64), dim, stride=8, image_size=48,
                                     score_threshold=0.2, iou=0.5, max_out=20)
        for a, b in zip(ints, floats):
            got = a.to_float()
            assert got.labels.tolist() == b.labels.tolist()
            np.testing.assert_allclose(got.boxes, b.boxes, atol=1 / 16 + 1e-9)  # table rounding: 1/32 px per term
            np.testing.assert_allclose(got.scores, b.scores, atol=3e-4)
    with pytest.raises(ValueError, match="not one of the Matryoshka dims"):
        decode.decode_int8(q, rows, dims, 5, zero_point=zp, scale=scale, stride=8, image_size=48, threshold_q=0,
                           iou=0.5, max_out=5)


def test_integer_decode_clamps_boxes_to_the_image_and_orders_ties_by_cell():
    grid, embed = 2, 2
    q = np.full((1, EMBED + embed, grid, grid), -128, dtype=np.int8)
    q[0, 0] = 127                     # every cell confident
    q[0, EMBED:] = 100                # the same embedding everywhere: equal scores
    q[0, 3:5] = 127                   # huge boxes: clamped to the image
    rows = np.array([[1, 1]], dtype=np.int8)
    [det] = decode.decode_int8(q, rows, [2], 2, zero_point=0, scale=0.05, stride=8, image_size=16,
                               threshold_q=0, iou=1.0, max_out=10)
    assert det.boxes.min() == 0 and det.boxes.max() == 16 * 16
    assert len(det.scores) == 4 and len(set(det.scores.tolist())) == 1
    [one] = decode.decode_int8(q, rows, [2], 2, zero_point=0, scale=0.05, stride=8, image_size=16,
                               threshold_q=0, iou=0.5, max_out=10)
    assert len(one.scores) == 1  # all four boxes are the whole image: the first cell keeps it


def test_tables_follow_their_formulas():
    t = decode.tables(0.1, -2, 8)
    q = 10
    x = (q + 2) * np.float32(0.1)
    assert t["objectness_q15"][q + 128] == round(32767 / (1 + math.exp(-x)))
    assert t["center_q4"][q + 128] == round(x * 8 * 16)
    assert t["half_q4"][q + 128] == round(math.exp(x) * 8 * 8)
    assert t["objectness_q15"].dtype == np.int16 and t["half_q4"].min() >= 0


# -- targets, crops, basis --------------------------------------------------------------------------


def test_cells_go_to_the_smaller_box_and_crowds_are_ignored():
    boxes = Boxes.from_images([
        (np.array([[0, 0, 32, 32], [8, 8, 16, 16]]), np.array([1, 2])),
        (np.array([[16, 16, 32, 32]]), np.array([3]), np.array([True])),
        (np.zeros((0, 4)), np.zeros(0)),
    ])
    cells = assign_cells(boxes, 4, 8, 0.25)
    assert cells.shape == (3, 4, 4)
    assert cells[0, 1, 1] == 1  # the small box's centre cell: its row (1), not the big box's (0)
    assert cells[0, 2, 2] == 0 and cells[0, 0, 0] == -1
    assert (cells[1, 2:, 2:] == -2).all() and (cells[1, :2] == -1).all()
    assert (cells[2] == -1).all()


def test_crops_cut_the_box_square_and_resize_it():
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 8:16, 4:12] = 1.0
    out = crops(image, [[4, 8, 12, 16]], 8, 0.0)
    assert out.shape == (1, 1, 8, 8)
    assert float(out[0, 0, 1:7, 1:7].min()) > 0.99 and float(out.min()) > 0.7  # bilinear: edges blend a little
    wide = crops(image, [[4, 8, 12, 16]], 8, 0.5)  # twice the side: the square sits in the middle half
    assert float(wide[0, 0, 3:5, 3:5].min()) > 0.99 and float(wide[0, 0, 0, 0]) == 0.0


def test_region_basis_is_orthonormal_deterministic_and_needs_enough_boxes():
    rng = np.random.default_rng(0)
    regions = rng.standard_normal((50, 12)).astype(np.float32)
    a = region_basis(regions, 6, seed=0)
    b = region_basis(regions, 6, seed=0)
    assert a.shape == (12, 6) and torch.equal(a, b)
    np.testing.assert_allclose((a.T @ a).numpy(), np.eye(6), atol=1e-5)
    assert (a[a.abs().argmax(dim=0), torch.arange(6)] > 0).all()
    with pytest.raises(PassError, match="span at most"):
        region_basis(regions[:3], 6, seed=0)


def test_class_rows_quantize_per_row():
    q = quantize_rows(np.array([[0.5, -1.0], [0.0, 0.0]]))
    assert q["values"].tolist() == [[64, -127], [0, 0]]
    assert q["scales"][1] == 1.0


# -- the pass, end to end -------------------------------------------------------------------------

SPEC = """
[distillc]
spec_version = 1
name = "det"

[data]
source = "digit-scenes"
image_size = 32
channels = 1
val_fraction = 0.5
options = {{ scenes = 80, digit_size = [0.3, 0.6], unseen = [8, 9], unseen_in_train = "absent" }}

[[teachers]]
name = "vit"
arch = "vit_tiny_patch4"
depth = 1
train = {{ epochs = 1, batch_size = 256, lr = 3e-3, data = {{ source = "sklearn-digits", image_size = 8, channels = 1 }} }}

[student]
arch = "mobilenetv2"
width = 0.35
last_channels = 16

[[passes]]
use = "detect.open-vocab"
teacher = "vit"
dims = [4, 8]
epochs = 2
batch_size = 16
shots = 1
dense_weight = 0.5
{extra}
[[passes]]
use = "eval.detection"

[[passes]]
use = "quantize.brevitas-qat"
epochs = 1
calib_images = 16
probe = false
gate = "off"

[[passes]]
use = "eval.detection"

[target]
use = "host"
"""


@pytest.fixture(scope="module")
def compiled(module_folder):
    spec = module_folder / "spec.toml"
    spec.write_text(SPEC.format(extra=""))
    return compile_spec(spec)


def test_the_pass_trains_a_detector_and_records_its_head_and_classes(compiled):
    metrics = compiled.report["metrics"]["detect.open-vocab"]
    assert metrics["grid"] == [4, 4] and metrics["stride"] == 8
    assert metrics["loss"] < metrics["first_loss"]
    assert metrics["teacher_input"] == [1, 8, 8]  # the teacher takes 8-px crops, its own data's size
    for part in ("objectness_loss", "box_loss", "embedding_loss"):
        assert metrics[part] is not None and metrics[part] > 0


def test_eval_reports_map_per_dim_seen_unseen_and_the_random_baseline(compiled):
    for step in ("eval.detection", "eval.detection#2"):
        m = compiled.report["metrics"][step]
        assert set(m["per_dim"]) == {"4", "8"} and m["dim"] == 8
        for key in ("map50", "map", "seen_map50", "unseen_map50"):
            assert m[key] is None or 0.0 <= m[key] <= 1.0
        assert set(m["random_classes"]) == {"4", "8"}
        assert 0.0 <= m["class_agnostic"]["map50"] <= 1.0
        assert m["support_images"] >= 1 and m["images"] + m["support_images"] == 40
    assert compiled.report["metrics"]["eval.detection#2"]["quantized"] is True
    assert compiled.report["metrics"]["quantize.brevitas-qat"]["objective"] == "detect.open-vocab"


def test_the_whole_pipeline_ends_in_a_bundle_whose_decoder_is_verified(compiled):
    manifest = json.loads((compiled.final_path / "manifest.json").read_text())
    assert manifest["output"]["shape"] == [1, EMBED + 8, 4, 4]
    entry = manifest["detection"]
    assert entry["dims"] == [4, 8] and entry["grid"] == 4 and len(entry["classes"]) == 10
    check = manifest["verification"]["host"]["detection"]
    assert check["decoder_matches"] is True and check["decoded"] > 0
    assert "distillc_detect" in (compiled.final_path / "include" / "distillc_model.h").read_text()


def test_the_artifact_rebuilds_its_head_and_keeps_the_class_table(compiled, module_folder):
    from distillc.plan import build_plan

    plugins = load_plugins()
    spec = load_spec(module_folder / "spec.toml", plugins)
    plan = build_plan(spec, plugins)
    step = next(s for s in plan.steps if s.id == "detect.open-vocab")
    artifact = plan.store.load(step.key)
    info = artifact.meta["detection"]
    assert info["dims"] == [4, 8] and info["grid"] == 4 and info["stride"] == 8
    assert info["classes"] == [str(d) for d in range(10)] and info["unseen"] == [8, 9]
    assert np.asarray(info["rows_int8"]).shape == (10, 8)
    assert artifact.head["type"] == "detection" and artifact.head["pass"] == "detect.open-vocab"
    model = artifact.build(plugins).eval()
    out = model(torch.zeros(2, 1, 32, 32))
    assert tuple(out.shape) == (2, EMBED + 8, 4, 4)


def test_detection_needs_a_detection_source(write_spec):
    text = SPEC.format(extra="").replace('source = "digit-scenes"', 'source = "sklearn-digits"')
    text = text.replace('options = { scenes = 80, digit_size = [0.3, 0.6], unseen = [8, 9], unseen_in_train = "absent" }',
                        "")
    with pytest.raises(PassError, match="no boxes; detection needs a detection source"):
        compile_spec(write_spec(text), until="detect.open-vocab")


def test_dims_beyond_the_teachers_width_are_refused(write_spec):
    text = SPEC.format(extra="").replace("dims = [4, 8]", "dims = [4, 512]")
    with pytest.raises(PassError, match="must not exceed it"):
        compile_spec(write_spec(text), until="detect.open-vocab")


def test_a_teacher_on_unlabelled_scenes_is_told_to_bring_its_own_data(write_spec):
    text = SPEC.format(extra="").replace(', data = { source = "sklearn-digits", image_size = 8, channels = 1 }', "")
    with pytest.raises(PassError, match="train.data"):
        compile_spec(write_spec(text), until="teacher:vit")


def test_a_bad_teacher_data_section_names_its_key_path(write_spec):
    text = SPEC.format(extra="").replace('data = { source = "sklearn-digits"', 'data = { source = "no-such"')
    with pytest.raises(SpecError, match=r"teachers\[0\]\.train\.data\.source"):
        load_spec(write_spec(text), load_plugins())


def test_the_teachers_own_data_enters_its_key(write_spec, tmp_path):
    from distillc.plan import build_plan

    plugins = load_plugins()
    keys = []
    for size in (8, 16):
        text = SPEC.format(extra="").replace("image_size = 8, channels = 1", f"image_size = {size}, channels = 1")
        spec = load_spec(write_spec(text, name=f"s{size}.toml"), plugins)
        step = next(s for s in build_plan(spec, plugins).steps if s.id == "teacher:vit")
        keys.append(step.key)
        assert json.dumps(step.key_payload["config"]["data"]).count(str(size)) >= 1
        assert step.key_payload["config"]["data_fingerprint"].startswith("sklearn-digits:")
    assert keys[0] != keys[1]


def test_class_file_and_prompts_go_with_their_source(write_spec):
    bad = SPEC.format(extra='prompts = ["a {}"]')
    with pytest.raises(SpecError, match="prompts are read with class_source = 'text'"):
        load_spec(write_spec(bad), load_plugins())
    missing = SPEC.format(extra='class_source = "file"')
    with pytest.raises(SpecError, match="class_file goes with class_source"):
        load_spec(write_spec(missing, name="m.toml"), load_plugins())


def test_class_embeddings_from_a_file_are_checked_and_used(write_spec, tmp_path):
    np.save(tmp_path / "wrong.npy", np.ones((3, 4), np.float32))
    text = SPEC.format(extra='class_source = "file"\nclass_file = "wrong.npy"')
    with pytest.raises(PassError, match=r"expected \(10, "):
        compile_spec(write_spec(text), until="detect.open-vocab")


def test_text_class_embeddings_come_from_the_clip_teachers_text_tower(module_folder):
    """class_source = "text": the data's class names through the prompts and the text tower, in the
    region coordinates (the teacher's crops' SVD basis), one INT8 row per class."""
    from distillc.passes.detect.openvocab import _embed_crops
    from distillc.plan import build_plan
    from distillc.plugins.models.teacher_input import with_input
    from tests.test_class_prompts import TEACHER, reference_class_embeddings
    from tests.test_clip_tokenizer import MERGES, VOCAB_SIZE, write_bpe

    folder = module_folder / "text"
    folder.mkdir()
    write_bpe(folder / "bpe.txt.gz", MERGES)
    teacher = TEACHER.format(vocab=VOCAB_SIZE, tokenizer='tokenizer = "bpe.txt.gz"').replace(
        "train = { epochs = 1, batch_size = 256, lr = 3e-3 }",
        'train = { epochs = 1, batch_size = 256, lr = 3e-3, data = { source = "sklearn-digits", image_size = 8, '
        'channels = 1 } }')
    text = SPEC.format(extra='class_source = "text"\nprompts = ["a photo of a {}.", "the digit {}"]')
    head, rest = text.split("[[teachers]]", 1)
    text = head + teacher + "\n[student]" + rest.split("[student]", 1)[1]
    text = text.replace('teacher = "vit"', 'teacher = "clip"')
    (folder / "spec.toml").write_text(text)
    result = compile_spec(folder / "spec.toml", until="detect.open-vocab")
    plugins = load_plugins()
    plan = build_plan(load_spec(folder / "spec.toml", plugins), plugins)
    store = plan.store
    clip = store.load(next(s for s in plan.steps if s.id == "teacher:clip").key)
    info = store.load(next(s for s in plan.steps if s.id == "detect.open-vocab").key).meta["detection"]
    assert info["class_source"] == "text" and info["support_images"] == []
    # the reference: the crops' basis, then the prompt ensemble in its coordinates
    data = plan.spec.load_data(plugins)
    boxes = data.train_boxes
    owner = np.searchsorted(boxes.offsets, np.arange(len(boxes.labels)), side="right") - 1
    images = torch.as_tensor(np.stack([np.asarray(data.train_x[int(i)]) for i in owner]))
    module = with_input(clip.build(plugins), clip.meta.get("input")).eval()
    regions = _embed_crops(module, images, boxes.boxes, size=8, margin=0.0, device=torch.device("cpu"))
    basis = region_basis(regions, 8, seed=0).double()
    ref = torch.as_tensor(reference_class_embeddings(clip.build(plugins).eval(), [str(d) for d in range(10)],
                                                     ["a photo of a {}.", "the digit {}"])).double()
    want = quantize_rows((torch.nn.functional.normalize(ref, dim=1) @ basis).numpy())["values"]
    got = np.asarray(info["rows_int8"])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert result.report["metrics"]["detect.open-vocab"]["classes"] == 10


def test_a_coco_folder_trains_a_detector_with_class_embeddings_from_a_file(tmp_path):
    """coco-detection (an image folder + instances JSON, crowd boxes included) through detect.open-vocab
    and eval.detection, with the class embeddings a user brings as a .npy in the teacher's space."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for i in range(16):
        canvas = np.zeros((40, 40, 3), np.uint8)
        for k in range(2):
            x, y, w, h = (int(v) for v in rng.integers(0, 24, 2).tolist() + rng.integers(8, 16, 2).tolist())
            category = int(rng.integers(1, 4))
            canvas[y:y + h, x:x + w] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)][category - 1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category,
                                "bbox": [x, y, w, h], "iscrowd": int(i == 0 and k == 0)})
        Image.fromarray(canvas).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 40})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                         "categories": categories}))
    np.save(tmp_path / "classes.npy", rng.standard_normal((3, 192)).astype(np.float32))
    text = SPEC.format(extra='class_source = "file"\nclass_file = "classes.npy"')
    text = text.replace('source = "digit-scenes"', 'source = "coco-detection"\npath = "."')
    text = text.replace("channels = 1\nval_fraction = 0.5", "channels = 3\nval_fraction = 0.25")
    text = text.replace('options = { scenes = 80, digit_size = [0.3, 0.6], unseen = [8, 9], unseen_in_train = "absent" }',
                        'options = { images = "images", unseen = ["blue"] }')
    text = text.replace('image_size = 8, channels = 1 }', 'image_size = 8, channels = 3 }')
    (tmp_path / "spec.toml").write_text(text)
    result = compile_spec(tmp_path / "spec.toml", until="eval.detection")
    metrics = result.report["metrics"]
    assert metrics["detect.open-vocab"]["classes"] == 3 and metrics["detect.open-vocab"]["grid"] == [4, 4]
    evaluation = metrics["eval.detection"]
    assert evaluation["support_images"] == 0 and evaluation["images"] == 4
    assert set(evaluation["per_class"]) == {"red", "green", "blue"}


def test_two_processes_train_the_detector_and_embed_the_crops_once(tmp_path):
    """Under torchrun (2 CPU processes, gloo) rank 0 embeds the crops while rank 1 waits, both train
    on halves of every batch, and the pass finishes (no rank left at a barrier)."""
    import os
    import subprocess
    import sys

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(extra=""))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(DISTILLC_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", DISTILLC_DEVICE="cpu")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           "-m", "distillc.cli", "compile", str(spec), "--until", "detect.open-vocab", "--workdir",
                           str(tmp_path / "build")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["world_size"] == 2
    assert {row["id"]: row["status"] for row in report["plan"]}["detect.open-vocab"] == "ran"
    folder = tmp_path / "cache" / "derived" / "teacher-targets"
    kinds = sorted(json.loads(p.read_text())["what"] for p in folder.glob("*.json"))
    assert [k.split(":")[0] for k in kinds] == ["dense", "regions"] and not list(folder.glob("*.tmp"))
