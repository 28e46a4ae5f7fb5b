"""The bundle's detection API: ``distillc_detect`` in C, and how the bundle is checked against
:func:`distillc.passes.detect.decode.decode_int8`.

``detect.open-vocab`` leaves ``meta["detection"]`` on the model; ``codegen.c`` asks the pass for
its C (``OpenVocabPass.c_extension``), which lands here: :func:`detection_extension` writes
``src/distillc_detect.c`` (class rows, their squared norms per dim and the decoder's three
tables as ``const`` arrays in flash; the decoder itself) and its declarations in
``include/distillc_model.h``.  The C is the integer decode of ``decode.py`` written out: LUT
objectness in Q15, isqrt cosine in 64 bits, Q4 boxes, a heap sort of the candidates by
(score, cell) and greedy per-class NMS, so for every map it returns exactly what
``decode_int8`` returns.  The candidates (``DISTILLC_DETECT_CANDIDATE_BYTES`` per cell) live in
the activation arena between inferences (``CExtension.arena_scratch_bytes``), as does the map
``distillc_detect`` runs the model into: the decoder adds no RAM unless the arena is smaller
than map plus candidates.

:func:`check_detections` is what ``verify.host`` and ``verify.qemu`` run on the detection
program's results (``targets.runner.detect_on_host`` / ``detect_on_qemu``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from distillc.errors import PassError

from .decode import BOX_FRACTION_BITS, IOU_BITS, decode_int8, iou_q8, row_norms_sq, tables

#: The bundle source the extension writes.
DETECT_SOURCE = "src/distillc_detect.c"
#: Bytes of one candidate in the arena scratch: score, cell and class as uint16.
CANDIDATE_BYTES = 6
#: A detection's fields as the C struct holds them, in order (distillc_detection_t).
FIELDS = ("x0", "y0", "x1", "y1", "score_q15", "class_id")
#: Score thresholds and scores are fractions of this (Q15).
SCORE_ONE = 1 << 15

#: Floor square root of a uint64 (digit by digit, exact for every value: Python's math.isqrt).
ISQRT_C = """static uint64_t distillc_detect_isqrt(uint64_t n)
{
    uint64_t root = 0;
    uint64_t bit = (uint64_t)1 << 62;

    while (bit > n) {
        bit >>= 2;
    }
    while (bit != 0) {
        if (n >= root + bit) {
            n -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    return root;
}
"""


def threshold_q15(fraction: float) -> int:
    """A score threshold in 0..1 as ``distillc_detect`` takes it: ``round(fraction * 32768)``."""
    return int(round(float(fraction) * SCORE_ONE))


def rows_to_hex(rows: Any) -> list[str]:
    """int8 class rows as one hex string each (two's complement bytes), for the manifest."""
    return [bytes(np.asarray(row, dtype=np.int8).view(np.uint8).tolist()).hex() for row in np.asarray(rows)]


def rows_from_hex(rows: Sequence[str]) -> np.ndarray:
    """The int8 rows :func:`rows_to_hex` wrote, ``(K, E)``."""
    return np.stack([np.frombuffer(bytes.fromhex(r), dtype=np.int8) for r in rows]).astype(np.int8)


# -- the extension -----------------------------------------------------------------------------------


def detection_extension(info: dict[str, Any], *, name: str, output_size: int, output: dict[str, Any] | None,
                        pass_name: str = "codegen.c") -> Any:
    """The bundle extension for ``meta["detection"]`` (``info``): ``src/distillc_detect.c``, its
    declarations, the manifest's ``detection`` entry and its flash bytes."""
    from distillc.passes.backend.codegen import CExtension

    from distillc.plugins.models.detection_head import EMBED

    if output is None:
        raise PassError(pass_name, "the detection decoder needs the output's scale and zero point, and this "
                                   "code generator does not pass them (c_extension's output keyword)")
    rows = np.asarray(info["rows_int8"], dtype=np.int64)
    dims = [int(d) for d in info["dims"]]
    grid, stride, image_size = int(info["grid"]), int(info["stride"]), int(info["image_size"])
    classes = [str(c) for c in info["classes"]]
    embed = int(info["embed_dim"])
    expected = [1, EMBED + embed, grid, grid]
    problems = []
    if [int(d) for d in output["shape"]] != expected or output_size != int(np.prod(expected)):
        problems.append(f"the model outputs {list(output['shape'])}, the detection head {expected} "
                        f"(1, 5 + embedding, grid, grid)")
    if rows.ndim != 2 or rows.shape != (len(classes), embed) or not len(classes):
        problems.append(f"the class rows are {list(rows.shape)}, expected [{len(classes)}, {embed}] (classes, "
                        "embedding) with at least one class")
    elif rows.min() < -127 or rows.max() > 127:
        problems.append("the class rows hold values outside -127..127")
    if not dims or any(d < 1 or d > embed for d in dims) or any(b <= a for a, b in zip(dims, dims[1:])):
        problems.append(f"dims {dims} must increase within 1..{embed}")
    if grid * grid > 65535 or len(classes) > 65535:
        problems.append(f"{grid * grid} cells and {len(classes)} classes: the decoder indexes both in 16 bits")
    if stride < 1 or image_size < 1 or image_size << BOX_FRACTION_BITS >= 1 << 24:
        problems.append(f"stride {stride} and image size {image_size} must be positive (and the image below "
                        f"{1 << (24 - BOX_FRACTION_BITS)} px)")
    if problems:
        raise PassError(pass_name, "cannot write distillc_detect: " + "; ".join(problems))
    lut = tables(float(output["scale"]), int(output["zero_point"]), stride)
    norms = row_norms_sq(rows, dims)
    entry = detection_manifest(info, rows=rows, dims=dims, classes=classes)
    decl = _declarations(info, dims=dims, classes=classes, embed=embed)
    source = _source(name, rows=rows, norms=norms, lut=lut, classes=classes, grid=grid)
    return CExtension(name="detection", declarations=decl, sources={DETECT_SOURCE: source}, manifest=entry,
                      flash_bytes=entry["flash_bytes"], arena_scratch_bytes=entry["scratch_bytes"])


def detection_manifest(info: dict[str, Any], *, rows: Any, dims: list[int], classes: list[str]) -> dict[str, Any]:
    """The manifest's ``detection`` entry: what the C holds, how to call it, and its memory."""
    k, embed, n_dims, grid = len(classes), int(info["embed_dim"]), len(dims), int(info["grid"])
    name_bytes = sum(len(c.encode("utf-8")) + 1 for c in classes) + 4 * k  # strings + a 32-bit pointer each
    table_bytes = 256 * (2 + 4 + 4)
    row_bytes, norm_bytes, dims_bytes = k * embed, 4 * k * n_dims, 4 * n_dims
    return {
        "classes": classes, "seen": list(info.get("seen", [])), "unseen": list(info.get("unseen", [])),
        "dims": dims, "embed_dim": embed, "grid": grid, "stride": int(info["stride"]),
        "image_size": int(info["image_size"]),
        "score_threshold": float(info["score_threshold"]),
        "score_threshold_q15": threshold_q15(info["score_threshold"]),
        "iou": float(info["iou"]), "iou_q8": iou_q8(info["iou"]), "max_detections": int(info["max_detections"]),
        "rows_int8_hex": rows_to_hex(rows), "row_scales": [float(s) for s in info.get("row_scales", [])],
        "table_bytes": table_bytes, "row_bytes": row_bytes, "norm_bytes": norm_bytes, "dims_bytes": dims_bytes,
        "name_bytes": name_bytes, "flash_bytes": table_bytes + row_bytes + norm_bytes + dims_bytes + name_bytes,
        "flash_bytes_per_class": embed + 4 * n_dims + 4, "flash_bytes_per_dim": 4 * k + 4,
        "scratch_bytes": CANDIDATE_BYTES * grid * grid, "scratch": "arena",
        "file": DETECT_SOURCE, "functions": ["distillc_detect", "distillc_detect_output"],
    }


def _declarations(info: dict[str, Any], *, dims: list[int], classes: list[str], embed: int) -> str:
    return f"""/* Open-vocabulary detection (src/distillc_detect.c): the output is a (5 + E) x G x G map; per
 * cell an objectness logit, a box (centre x, y in cells from the cell's corner; log width,
 * height in cells) and a Matryoshka embedding whose first d values (d in DISTILLC_DETECT_DIMS)
 * are an embedding of their own. A cell's class is the one whose int8 row is most similar
 * (cosine) at dim d; its score is sigmoid(objectness) * max(cosine, 0), in Q15 (a fraction of
 * 32768). Boxes are in 1/16 pixel of the DISTILLC_DETECT_IMAGE_SIZE image (divide by 16). */
#define DISTILLC_DETECT_NUM_CLASSES {len(classes)}
#define DISTILLC_DETECT_EMBED_DIM {embed}
#define DISTILLC_DETECT_NUM_DIMS {len(dims)}
#define DISTILLC_DETECT_DIMS {{{', '.join(str(d) for d in dims)}}}
#define DISTILLC_DETECT_GRID {int(info["grid"])}
#define DISTILLC_DETECT_STRIDE {int(info["stride"])}
#define DISTILLC_DETECT_IMAGE_SIZE {int(info["image_size"])}
#define DISTILLC_DETECT_BOX_FRACTION_BITS {BOX_FRACTION_BITS}
/* The spec's defaults: score threshold in Q15, NMS IoU in Q{IOU_BITS}, detections per image. */
#define DISTILLC_DETECT_SCORE_THRESHOLD_Q15 {threshold_q15(info["score_threshold"])}
#define DISTILLC_DETECT_IOU_Q8 {iou_q8(info["iou"])}
#define DISTILLC_DETECT_MAX_DETECTIONS {int(info["max_detections"])}
/* Bytes of one candidate; the decoder keeps DISTILLC_DETECT_GRID^2 of them in the arena. */
#define DISTILLC_DETECT_CANDIDATE_BYTES {CANDIDATE_BYTES}

/* One detection: box corners (x0, y0) - (x1, y1) in 1/16 pixel, clamped to the image; score in
 * Q15; class_id indexes distillc_detect_class_names. */
typedef struct {{
    int32_t x0;
    int32_t y0;
    int32_t x1;
    int32_t y1;
    int32_t score_q15;
    int32_t class_id;
}} distillc_detection_t;

extern const int8_t distillc_detect_rows[DISTILLC_DETECT_NUM_CLASSES * DISTILLC_DETECT_EMBED_DIM];
extern const int32_t distillc_detect_dims[DISTILLC_DETECT_NUM_DIMS];
extern const char *const distillc_detect_class_names[DISTILLC_DETECT_NUM_CLASSES];

/* Runs the model on `input` (DISTILLC_INPUT_SIZE int8 values) and decodes its map at Matryoshka
 * dim `dim`: cells scoring at least `score_threshold_q` (Q15; DISTILLC_DETECT_SCORE_THRESHOLD_Q15
 * is the spec's) become boxes, best first (ties: lower cell), and greedy per-class NMS keeps a
 * box unless a kept box of its class overlaps it by IoU above DISTILLC_DETECT_IOU_Q8 / 256.
 * Writes at most `max_out` detections to `out` and returns how many; -1 if `dim` is not one of
 * DISTILLC_DETECT_DIMS, `max_out` is negative or a pointer is NULL (NULL `out` is fine with
 * max_out 0). The map and the candidates live in the model's arena: no heap, no extra RAM;
 * not reentrant, and not to be run while distillc_model_run runs. */
int distillc_detect(const int8_t *input, int dim, int32_t score_threshold_q, distillc_detection_t *out,
                    int max_out);

/* The same decode of a map distillc_model_run already wrote (DISTILLC_OUTPUT_SIZE int8 values,
 * outside the arena). */
int distillc_detect_output(const int8_t *map, int dim, int32_t score_threshold_q, distillc_detection_t *out,
                           int max_out);
"""


def _c_array(values: Sequence[int], per_line: int = 16) -> str:
    items = [str(int(v)) for v in values]
    return "\n".join("    " + ", ".join(items[i:i + per_line]) + "," for i in range(0, len(items), per_line))


def _source(name: str, *, rows: Any, norms: Any, lut: dict[str, Any], classes: list[str], grid: int) -> str:
    from distillc.passes.distill.matryoshka import _c_string
    from distillc.plugins.models.detection_head import CENTER_X, CENTER_Y, EMBED, LOG_H, LOG_W, OBJECTNESS

    names = ",\n".join(f'    "{_c_string(c)}"' for c in classes)
    cells = grid * grid
    return f"""/* Detection decoder of distillc model "{_c_string(name)}". Generated by distillc; do not edit.
 * The integer decode of distillc's passes/detect/decode.py (decode_int8), step for step. */
#include <stddef.h>
#include <stdint.h>

#include "distillc_model.h"
#include "distillc_internal.h"

#if DISTILLC_OUTPUT_SIZE != (5 + DISTILLC_DETECT_EMBED_DIM) * DISTILLC_DETECT_GRID * DISTILLC_DETECT_GRID
#error "the detection decoder was written for another output size"
#endif

#define DISTILLC_DETECT_CELLS {cells}

/* int8 class rows, DISTILLC_DETECT_NUM_CLASSES x DISTILLC_DETECT_EMBED_DIM ({len(classes)} x {rows.shape[1]}). */
const int8_t distillc_detect_rows[DISTILLC_DETECT_NUM_CLASSES * DISTILLC_DETECT_EMBED_DIM] = {{
{_c_array(rows.reshape(-1).tolist(), 24)}
}};

const int32_t distillc_detect_dims[DISTILLC_DETECT_NUM_DIMS] = DISTILLC_DETECT_DIMS;

const char *const distillc_detect_class_names[DISTILLC_DETECT_NUM_CLASSES] = {{
{names}
}};

/* |row[:d]|^2 per dim (row-major: dim level, class). */
static const int32_t distillc_detect_row_norms[DISTILLC_DETECT_NUM_DIMS * DISTILLC_DETECT_NUM_CLASSES] = {{
{_c_array(norms.reshape(-1).tolist(), 8)}
}};

/* Indexed by q + 128, x = (q - DISTILLC_OUTPUT_ZERO_POINT) * DISTILLC_OUTPUT_SCALE:
 * round(sigmoid(x) * 32767), round(x * stride * 16) and round(exp(x) * stride * 8). */
static const int16_t distillc_detect_objectness_q15[256] = {{
{_c_array(lut["objectness_q15"].tolist())}
}};

static const int32_t distillc_detect_center_q4[256] = {{
{_c_array(lut["center_q4"].tolist(), 8)}
}};

static const int32_t distillc_detect_half_q4[256] = {{
{_c_array(lut["half_q4"].tolist(), 8)}
}};

/* A cell that scored at least the threshold. */
typedef struct {{
    uint16_t score;
    uint16_t cell;
    uint16_t class_id;
}} distillc_detect_candidate_t;

{ISQRT_C}
/* Whether candidate a ranks after b: lower score, or the same score and a higher cell. */
static int distillc_detect_after(const distillc_detect_candidate_t *a, const distillc_detect_candidate_t *b)
{{
    return a->score < b->score || (a->score == b->score && a->cell > b->cell);
}}

static void distillc_detect_sift(distillc_detect_candidate_t *c, int32_t root, int32_t n)
{{
    for (;;) {{
        int32_t child = 2 * root + 1;
        distillc_detect_candidate_t t;

        if (child >= n) {{
            return;
        }}
        if (child + 1 < n && distillc_detect_after(&c[child + 1], &c[child])) {{
            ++child;
        }}
        if (!distillc_detect_after(&c[child], &c[root])) {{
            return;
        }}
        t = c[root];
        c[root] = c[child];
        c[child] = t;
        root = child;
    }}
}}

/* Best first; (score, cell) keys are distinct, so any correct sort gives this order. */
static void distillc_detect_sort(distillc_detect_candidate_t *c, int32_t n)
{{
    int32_t i;

    for (i = n / 2 - 1; i >= 0; --i) {{
        distillc_detect_sift(c, i, n);
    }}
    for (i = n - 1; i > 0; --i) {{
        distillc_detect_candidate_t t = c[0];
        c[0] = c[i];
        c[i] = t;
        distillc_detect_sift(c, 0, i);
    }}
}}

static int32_t distillc_detect_level(int dim)
{{
    int32_t i;

    for (i = 0; i < DISTILLC_DETECT_NUM_DIMS; ++i) {{
        if (distillc_detect_dims[i] == (int32_t)dim) {{
            return i;
        }}
    }}
    return -1;
}}

static int32_t distillc_detect_clamp(int32_t v)
{{
    const int32_t limit = (int32_t)DISTILLC_DETECT_IMAGE_SIZE << DISTILLC_DETECT_BOX_FRACTION_BITS;

    return v < 0 ? 0 : (v > limit ? limit : v);
}}

static int distillc_detect_decode(const int8_t *map, int32_t level, int32_t score_threshold_q,
                                  distillc_detection_t *out, int max_out, distillc_detect_candidate_t *cand)
{{
    const int32_t dim = distillc_detect_dims[level];
    const int8_t *objectness = map + {OBJECTNESS} * DISTILLC_DETECT_CELLS;
    int32_t count = 0;
    int32_t cell;
    int32_t j;
    int kept = 0;

    for (cell = 0; cell < DISTILLC_DETECT_CELLS; ++cell) {{
        const int8_t *embedding = map + {EMBED} * DISTILLC_DETECT_CELLS + cell;
        int32_t embed_sq = 0;
        int32_t best_cos = -1;
        int32_t best_class = 0;
        int32_t score;
        int32_t i;
        int32_t k;

        for (i = 0; i < dim; ++i) {{
            const int32_t v = (int32_t)embedding[i * DISTILLC_DETECT_CELLS] - (int32_t)DISTILLC_OUTPUT_ZERO_POINT;
            embed_sq += v * v;
        }}
        for (k = 0; k < DISTILLC_DETECT_NUM_CLASSES; ++k) {{
            const int8_t *row = &distillc_detect_rows[k * DISTILLC_DETECT_EMBED_DIM];
            const int32_t row_sq = distillc_detect_row_norms[level * DISTILLC_DETECT_NUM_CLASSES + k];
            int32_t dot = 0;
            int32_t cosine = 0;

            for (i = 0; i < dim; ++i) {{
                dot += ((int32_t)embedding[i * DISTILLC_DETECT_CELLS] - (int32_t)DISTILLC_OUTPUT_ZERO_POINT)
                       * (int32_t)row[i];
            }}
            if (dot > 0 && embed_sq > 0 && row_sq > 0) {{
                const uint64_t den = distillc_detect_isqrt((uint64_t)embed_sq * (uint64_t)row_sq);
                const uint64_t q = ((uint64_t)dot << 15) / den;
                cosine = q > 32767u ? 32767 : (int32_t)q;
            }}
            if (cosine > best_cos) {{
                best_cos = cosine;
                best_class = k;
            }}
        }}
        score = ((int32_t)distillc_detect_objectness_q15[(int32_t)objectness[cell] + 128] * best_cos) >> 15;
        if (score >= score_threshold_q) {{
            cand[count].score = (uint16_t)score;
            cand[count].cell = (uint16_t)cell;
            cand[count].class_id = (uint16_t)best_class;
            ++count;
        }}
    }}
    distillc_detect_sort(cand, count);
    for (j = 0; j < count && kept < max_out; ++j) {{
        const int32_t c = (int32_t)cand[j].cell;
        const int32_t cx = (c % DISTILLC_DETECT_GRID) * (DISTILLC_DETECT_STRIDE * 16)
                           + distillc_detect_center_q4[(int32_t)map[{CENTER_X} * DISTILLC_DETECT_CELLS + c] + 128];
        const int32_t cy = (c / DISTILLC_DETECT_GRID) * (DISTILLC_DETECT_STRIDE * 16)
                           + distillc_detect_center_q4[(int32_t)map[{CENTER_Y} * DISTILLC_DETECT_CELLS + c] + 128];
        const int32_t hw = distillc_detect_half_q4[(int32_t)map[{LOG_W} * DISTILLC_DETECT_CELLS + c] + 128];
        const int32_t hh = distillc_detect_half_q4[(int32_t)map[{LOG_H} * DISTILLC_DETECT_CELLS + c] + 128];
        distillc_detection_t b;
        int64_t area_b;
        int suppressed = 0;
        int k;

        b.x0 = distillc_detect_clamp(cx - hw);
        b.y0 = distillc_detect_clamp(cy - hh);
        b.x1 = distillc_detect_clamp(cx + hw);
        b.y1 = distillc_detect_clamp(cy + hh);
        b.score_q15 = (int32_t)cand[j].score;
        b.class_id = (int32_t)cand[j].class_id;
        area_b = (int64_t)(b.x1 - b.x0) * (int64_t)(b.y1 - b.y0);
        for (k = 0; k < kept; ++k) {{
            const distillc_detection_t *a = &out[k];
            int32_t w;
            int32_t h;
            int64_t inter = 0;
            int64_t uni;

            if (a->class_id != b.class_id) {{
                continue;
            }}
            w = (a->x1 < b.x1 ? a->x1 : b.x1) - (a->x0 > b.x0 ? a->x0 : b.x0);
            h = (a->y1 < b.y1 ? a->y1 : b.y1) - (a->y0 > b.y0 ? a->y0 : b.y0);
            if (w > 0 && h > 0) {{
                inter = (int64_t)w * (int64_t)h;
            }}
            uni = (int64_t)(a->x1 - a->x0) * (int64_t)(a->y1 - a->y0) + area_b - inter;
            if (inter * 256 > (int64_t)DISTILLC_DETECT_IOU_Q8 * uni) {{
                suppressed = 1;
                break;
            }}
        }}
        if (!suppressed) {{
            out[kept++] = b;
        }}
    }}
    return kept;
}}

static distillc_detect_candidate_t *distillc_detect_scratch(void)
{{
    return (distillc_detect_candidate_t *)(void *)(distillc_arena_base() + DISTILLC_ARENA_SCRATCH_OFFSET);
}}

int distillc_detect_output(const int8_t *map, int dim, int32_t score_threshold_q, distillc_detection_t *out,
                           int max_out)
{{
    const int32_t level = distillc_detect_level(dim);

    if (map == NULL || level < 0 || max_out < 0 || (out == NULL && max_out > 0)) {{
        return -1;
    }}
    return distillc_detect_decode(map, level, score_threshold_q, out, max_out, distillc_detect_scratch());
}}

int distillc_detect(const int8_t *input, int dim, int32_t score_threshold_q, distillc_detection_t *out,
                    int max_out)
{{
    int8_t *const map = (int8_t *)(void *)(distillc_arena_base() + DISTILLC_ARENA_OUTPUT_OFFSET);
    const int32_t level = distillc_detect_level(dim);

    if (input == NULL || level < 0 || max_out < 0 || (out == NULL && max_out > 0)) {{
        return -1;
    }}
    if (distillc_model_run(input, map) != 0) {{
        return -1;
    }}
    return distillc_detect_decode(map, level, score_threshold_q, out, max_out, distillc_detect_scratch());
}}
"""


# -- verification ------------------------------------------------------------------------------------


def verification_cases(entry: dict[str, Any]) -> list[tuple[int, int, int]]:
    """What ``verify.*`` decodes per input: every dim at the spec's threshold and at 0 (every cell a
    candidate, so sorting and NMS are exercised however weak the scores), up to ``max_detections``."""
    thresholds = sorted({int(entry["score_threshold_q15"]), 0}, reverse=True)
    return [(int(d), t, int(entry["max_detections"])) for d in entry["dims"] for t in thresholds]


def reference_detections(maps: Any, manifest: dict[str, Any], dim: int, threshold_q: int, max_out: int) -> list[Any]:
    """``decode_int8`` of int8 ``maps`` (one per row) with the decoder settings the manifest records."""
    entry, quant = manifest["detection"], manifest["output"]
    return decode_int8(np.asarray(maps), rows_from_hex(entry["rows_int8_hex"]), entry["dims"], dim,
                       zero_point=int(quant["zero_point"]), scale=float(quant["scale"]), stride=int(entry["stride"]),
                       image_size=int(entry["image_size"]), threshold_q=threshold_q, iou=float(entry["iou"]),
                       max_out=max_out)


def as_rows(detections: Any) -> np.ndarray:
    """An ``IntDetections`` as ``(k, 6)`` int64 rows in ``distillc_detection_t`` order."""
    return np.concatenate([np.asarray(detections.boxes, dtype=np.int64).reshape(-1, 4),
                           np.asarray(detections.scores, dtype=np.int64).reshape(-1, 1),
                           np.asarray(detections.labels, dtype=np.int64).reshape(-1, 1)], axis=1)


def check_detections(run: Any, manifest: dict[str, Any], *, outputs: Any, reference: Any, pass_name: str) -> dict:
    """Compare the detection program's results (``runner.DetectionRun``) with ``decode_int8``.

    Must hold, else a ``PassError``: the program's maps are the verified build's ``outputs``, and
    ``distillc_detect`` and ``distillc_detect_output`` return exactly ``decode_int8`` of those maps
    for every input and case.  Reported only: how ``decode_int8`` of onnxruntime's int8 maps
    (``reference``) compares (identical; within one step: same boxes and classes, scores at most
    one Q15 step apart; else differing)."""
    n = len(outputs)
    maps = np.asarray(run.outputs).reshape(n, -1)
    if not np.array_equal(maps, np.asarray(outputs).reshape(n, -1).astype(maps.dtype)):
        raise PassError(pass_name, "the detection program's model outputs differ from the verified build's: the "
                                   "bundle computes differently when linked with distillc_detect")
    ort = np.asarray(reference).reshape(n, -1)
    identical = within = detections = 0
    max_score_diff = 0
    differing: list[str] = []
    for c, (dim, threshold, max_out) in enumerate(run.cases):
        expected = [as_rows(d) for d in reference_detections(maps, manifest, dim, threshold, max_out)]
        from_ort = [as_rows(d) for d in reference_detections(ort, manifest, dim, threshold, max_out)]
        for i in range(n):
            for what, got in (("distillc_detect", run.detect[(i, c)]), ("distillc_detect_output",
                                                                         run.detect_output[(i, c)])):
                count, rows = got
                if count != len(expected[i]) or not np.array_equal(rows, expected[i]):
                    raise PassError(pass_name, _mismatch(what, i, dim, threshold, max_out, count, rows, expected[i]))
            detections += len(expected[i])
            a, b = expected[i], from_ort[i]
            if a.shape == b.shape and np.array_equal(a, b):
                identical += 1
                within += 1
            elif a.shape == b.shape and np.array_equal(a[:, [0, 1, 2, 3, 5]], b[:, [0, 1, 2, 3, 5]]) \
                    and np.abs(a[:, 4] - b[:, 4]).max() <= 1:
                within += 1
            else:
                differing.append(f"image {i} dim {dim} threshold {threshold}")
            if a.shape == b.shape and len(a):
                max_score_diff = max(max_score_diff, int(np.abs(a[:, 4] - b[:, 4]).max()))
    cases = n * len(run.cases)
    return {"images": n, "cases": [list(c) for c in run.cases], "decoded": cases, "detections": detections,
            "decoder_matches": True, "onnxruntime_identical": identical, "onnxruntime_within_one_step": within,
            "onnxruntime_differing": cases - within, "onnxruntime_first_differing": differing[:5],
            "onnxruntime_max_score_diff_q15": max_score_diff}


def _mismatch(what: str, image: int, dim: int, threshold: int, max_out: int, count: int, rows: Any,
              expected: Any) -> str:
    first = next((k for k in range(min(len(rows), len(expected))) if not np.array_equal(rows[k], expected[k])), None)
    detail = (f"detection {first}: C {rows[first].tolist()}, decode_int8 {expected[first].tolist()}" if first is not None
              else f"C returned {count}, decode_int8 {len(expected)} detections")
    return (f"{what} differs from decode_int8 on the map the C computed (image {image}, dim {dim}, threshold "
            f"{threshold} Q15, max_out {max_out}): {detail} (fields x0 y0 x1 y1 score_q15 class_id)")
