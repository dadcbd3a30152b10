"""Calibration images: a folder of pictures made into the .npz that compress reads.

The points must be preprocessed exactly as the model's own inputs were, or the sensitivities describe
inputs the model never sees. The model gives the input's name, shape, dtype and (mostly) layout; a preset
or explicit options give the rest: resizing, scaling, mean/std, channel order. Pillow reads the images
(the optional extra `images`), so that the core package does not depend on an image library.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from pfp_onnx.data import LABELS, input_specs
from pfp_onnx.errors import DataError, ModelError, OptionError
from pfp_onnx.model import load_model
from pfp_onnx.options import CHANNEL_ORDERS, LAYOUTS, RESIZES
from pfp_onnx.pipeline import analyze, recommended_points

DEFAULT_HOLDOUT = 0.2  # compress's --holdout: the share of the points that verify rather than score
SKIPPED_SHOWN = 3


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a point. Mean and std are per channel in R, G, B order (one value: every
    channel), applied after pixels 0–255 are scaled to 0–pixel_range and before the channels are reordered."""

    resize: str = "crop"  # crop: short side to fit, centre crop; letterbox: fit inside, pad; stretch
    crop_fraction: float = 1.0  # crop: the share of the resized short side the crop keeps (ImageNet 224/256)
    pixel_range: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: str = "RGB"  # the order the model reads colour channels in
    fill: int = 114  # letterbox: the grey level of the padding, 0–255

    def describe(self, height: int, width: int, colours: int) -> str:
        if self.resize == "crop":
            short = round(min(height, width) / self.crop_fraction)
            shape = f"short side resized to {short}, centre crop {height}x{width}"
        elif self.resize == "letterbox":
            shape = f"letterboxed into {height}x{width} (padding {self.fill})"
        else:
            shape = f"stretched to {height}x{width}"
        normalised = ("" if set(self.mean) == {0.0} and set(self.std) == {1.0} else
                      f", normalised with mean {_values(self.mean)} and std {_values(self.std)}")
        order = self.channels if colours == 3 else "grey"
        return f"{shape}, pixels scaled to 0–{self.pixel_range:g}{normalised}, {order}"


PRESETS = {
    # torchvision's ImageNet evaluation: Resize(256), CenterCrop(224), ToTensor, Normalize
    "imagenet": Preprocessing("crop", 0.875, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB"),
    # Ultralytics YOLO: letterbox with grey 114 padding, pixels 0–1, RGB, no mean/std
    "yolo": Preprocessing("letterbox", 1.0, 1.0, (0.0,), (1.0,), "RGB", 114),
}


@dataclass(frozen=True)
class CalibrationImages:
    """The arrays to save (the model input's points, and labels when asked for), what was done to make
    them, and how they compare with the number of points PFP's bound asks for."""

    arrays: dict[str, np.ndarray]
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    recommended_points: int | None = None  # for sensitivity (None: the model has no prunable layer)
    classes: tuple[str, ...] = ()  # the sub-folder of each label id, with labels

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))


def calibration_set(folder: str | os.PathLike, model: str | os.PathLike | onnx.ModelProto, *,
                    preset: str | None = None, size: tuple[int, int] | None = None, resize: str | None = None,
                    crop_fraction: float | None = None, pixel_range: float | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    channels: str | None = None, layout: str | None = None, fill: int | None = None,
                    labels: bool = False, limit: int | None = None, seed: int = 0) -> CalibrationImages:
    """Read every image under `folder` (with `labels`: under its sub-folders, one per class) and make the
    model's single image input from them. Options left at None take the preset's value, else the default
    Preprocessing's; the size and layout come from the model where it fixes them."""
    image_library = _pillow()
    if limit is not None and limit < 1:
        raise OptionError(f"--limit takes a number of images of at least 1; got {limit}.")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    preparation = _preprocessing(preset, resize=resize, crop_fraction=crop_fraction, pixel_range=pixel_range,
                                 mean=mean, std=std, channels=channels, fill=fill)
    spec, layout, colours, height, width = _geometry(proto, size, layout)
    _check_values(preparation, spec.dtype, colours)
    files, label_of, classes = _images(Path(folder), labels, image_library)
    if limit is not None and limit < len(files):
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), limit, replace=False))]
    point_shape = (colours, height, width) if layout == "NCHW" else (height, width, colours)
    points = np.empty((len(files), *point_shape), dtype=spec.dtype)
    read, skipped = [], []
    for path in files:
        try:
            pixels = _pixels(image_library, path, height, width, preparation, colours)
        except (OSError, ValueError, image_library.Image.DecompressionBombError):
            skipped.append(path)
            continue
        points[len(read)] = _point(pixels, preparation, layout, spec.dtype)
        read.append(path)
    if not read:
        raise DataError(f"None of the {len(files)} image file(s) under '{folder}' could be read as an image.")
    arrays = {spec.name: points[:len(read)]}
    notes = [f"{len(read)} images → '{spec.name}' {spec.dtype} {list(arrays[spec.name].shape)} ({layout}): "
             + preparation.describe(height, width, colours)]
    if labels:
        arrays[LABELS] = np.array([label_of[path] for path in read], dtype=np.int64)
        notes.append(_labels_note(classes))
    if skipped:
        shown = ", ".join(str(path) for path in skipped[:SKIPPED_SHOWN])
        notes.append(f"skipped {len(skipped)} file(s) that could not be read as images: {shown}"
                     + (", …" if len(skipped) > SKIPPED_SHOWN else ""))
    recommended = _recommended(proto, arrays[spec.name])
    advice, warnings = _points_advice(len(read), recommended)
    return CalibrationImages(arrays, tuple(notes + advice), tuple(warnings), recommended, classes)


def save_npz(images: CalibrationImages, path: str | os.PathLike) -> None:
    """Written whole or not at all (a temporary file beside the target, renamed over it), uncompressed so
    that compress reads large sets a few rows at a time; the name is kept as given, without adding .npz."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, **images.arrays)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _pillow():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise OptionError("Reading images needs Pillow: pip install 'pfp-onnx[images]' (or pip install Pillow), "
                          "or make the .npz yourself with numpy.savez.") from None
    return PIL


def _preprocessing(preset: str | None, **overrides) -> Preprocessing:
    if preset is not None and preset not in PRESETS:
        raise OptionError(f"Unknown --preset '{preset}'; use one of {', '.join(PRESETS)}.")
    chosen = {name: value for name, value in overrides.items() if value is not None}
    for name in ("mean", "std"):
        if name in chosen:
            chosen[name] = tuple(float(value) for value in chosen[name])
    preparation = replace(PRESETS[preset] if preset else Preprocessing(), **chosen)
    for value, allowed, option in ((preparation.resize, RESIZES, "--resize"),
                                   (preparation.channels, CHANNEL_ORDERS, "--channels")):
        if value not in allowed:
            raise OptionError(f"Unknown {option} '{value}'; use one of {', '.join(allowed)}.")
    if not 0 < preparation.crop_fraction <= 1:
        raise OptionError(f"--crop-fraction takes a share in (0, 1], e.g. 0.875; got {preparation.crop_fraction}.")
    if not preparation.pixel_range > 0:
        raise OptionError(f"--pixel-range takes a positive number, 1 or 255; got {preparation.pixel_range}.")
    if not preparation.mean or not preparation.std or any(value == 0 for value in preparation.std):
        raise OptionError("--mean and --std take one value or one per channel, and --std no zero.")
    if not 0 <= preparation.fill <= 255:
        raise OptionError(f"--fill takes a grey level from 0 to 255; got {preparation.fill}.")
    return preparation


def _geometry(model: onnx.ModelProto, size: tuple[int, int] | None, layout: str | None):
    """The image input, its layout, channel count, height and width."""
    specs = input_specs(model)
    if len(specs) != 1 or len(specs[0].dims) != 4:
        described = ", ".join(f"'{spec.name}' of rank {len(spec.dims)}" for spec in specs) or "none"
        raise ModelError(f"Making calibration images needs a model with one image input of rank 4 (NCHW or NHWC); "
                         f"this one has {described}. Make the .npz yourself with numpy.savez, one array per input.")
    spec = specs[0]
    if layout is None:
        layout = _layout(spec.dims)
        if layout is None:
            raise OptionError(f"Cannot tell the layout of input '{spec.name}' {_dims(spec.dims)} (no axis of 1 or 3 "
                              "channels); pass --layout NCHW or NHWC.")
    if layout not in LAYOUTS:
        raise OptionError(f"Unknown --layout '{layout}'; use one of {', '.join(LAYOUTS)}.")
    channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    colours = spec.dims[channel_axis] or 3
    if colours not in (1, 3):
        raise OptionError(f"Input '{spec.name}' {_dims(spec.dims)} has {colours} channels in {layout}; images give "
                          "1 (grey) or 3 (colour). Check --layout.")
    fixed = tuple(spec.dims[axis] for axis in spatial)
    if size is None:
        if None in fixed:
            raise OptionError(f"Input '{spec.name}' {_dims(spec.dims)} leaves its height or width open; give the "
                              "size the model runs at with --size, e.g. --size 224 or --size 480x640 (height x width).")
        return spec, layout, colours, fixed[0], fixed[1]
    if any(given != wanted for given, wanted in zip(size, fixed) if wanted is not None) or min(size) < 1:
        raise OptionError(f"--size {size[0]}x{size[1]} does not fit input '{spec.name}' {_dims(spec.dims)} "
                          f"({layout}); leave --size out to use the model's.")
    return spec, layout, colours, size[0], size[1]


def _layout(dims: tuple[int | None, ...]) -> str | None:
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return None


def _check_values(preparation: Preprocessing, dtype: np.dtype, colours: int) -> None:
    for name in ("mean", "std"):
        if len(getattr(preparation, name)) not in (1, colours):
            raise OptionError(f"--{name} takes one value or {colours} (one per channel); got "
                              f"{_values(getattr(preparation, name))}.")
    if np.issubdtype(dtype, np.floating):
        return
    plain = preparation.pixel_range == 255 and set(preparation.mean) == {0.0} and set(preparation.std) == {1.0}
    if not np.issubdtype(dtype, np.integer) or not plain:
        raise OptionError(f"The model's input is {dtype}: it takes raw pixels, so give --pixel-range 255 and no "
                          "--mean, --std or preset that normalises.")


def _images(folder: Path, labels: bool, image_library) -> tuple[list[Path], dict[Path, int], tuple[str, ...]]:
    """The image files (sorted), each one's label id, and the class folder of each id (with labels)."""
    if not folder.is_dir():
        raise DataError(f"Image folder '{folder}' does not exist or is not a folder.")
    image_library.Image.init()
    extensions = {extension for extension, kind in image_library.Image.registered_extensions().items()
                  if kind in image_library.Image.OPEN}

    def found(under: Path) -> list[Path]:
        return sorted(path for path in under.rglob("*") if path.suffix.lower() in extensions and path.is_file())

    if not labels:
        files = found(folder)
        if not files:
            raise DataError(f"No image files under '{folder}' (looked for {', '.join(sorted(extensions)[:8])}, …).")
        return files, {}, ()
    loose = [path.name for path in folder.iterdir() if path.suffix.lower() in extensions and path.is_file()]
    if loose:
        raise DataError(f"With --labels every image must lie in a sub-folder named for its class, but "
                        f"{len(loose)} lie directly in '{folder}' (e.g. {loose[0]}); move them into class folders "
                        "or leave --labels out.")
    class_folders = sorted((path for path in folder.iterdir() if path.is_dir() and found(path)),
                           key=lambda path: path.name)
    if not class_folders:
        raise DataError(f"--labels reads classes from sub-folders of '{folder}' ({folder}/<class>/image.jpg), and "
                        "none holds images.")
    numbered = all(path.name.isdigit() for path in class_folders)
    ids = [int(path.name) if numbered else index for index, path in enumerate(class_folders)]
    classes = [""] * (max(ids) + 1)
    files, label_of = [], {}
    for class_id, class_folder in zip(ids, class_folders):
        classes[class_id] = class_folder.name
        for path in found(class_folder):
            files.append(path)
            label_of[path] = class_id
    return files, label_of, tuple(classes)


def _labels_note(classes: tuple[str, ...]) -> str:
    named = [(class_id, name) for class_id, name in enumerate(classes) if name]
    if all(name == str(class_id) for class_id, name in named):
        return f"labels: the sub-folders' names are the class ids ({len(named)} classes)"
    shown = ", ".join(f"{class_id} {name}" for class_id, name in named[:4])
    return (f"labels: {len(named)} sub-folders numbered in sorted order ({shown}{', …' if len(named) > 4 else ''}); "
            "if the model numbers its classes otherwise, name the folders by class id")


def _pixels(image_library, path: Path, height: int, width: int, preparation: Preprocessing,
            colours: int) -> np.ndarray:
    """The image as float32 [height, width, colours], 0–255, upright (EXIF orientation applied)."""
    Image, ImageOps = image_library.Image, image_library.ImageOps
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("L" if colours == 1 else "RGB")
    resized = _resized(Image, image, height, width, preparation)
    return np.asarray(resized, dtype=np.float32).reshape(height, width, colours)


def _resized(Image, image, height: int, width: int, preparation: Preprocessing):
    bilinear = Image.Resampling.BILINEAR
    if preparation.resize == "stretch":
        return image.resize((width, height), bilinear)
    if preparation.resize == "letterbox":
        ratio = min(height / image.height, width / image.width)
        inner = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
        grey = preparation.fill if image.mode == "L" else (preparation.fill,) * 3
        canvas = Image.new(image.mode, (width, height), grey)
        canvas.paste(image.resize(inner, bilinear), ((width - inner[0]) // 2, (height - inner[1]) // 2))
        return canvas
    scale = max(height / image.height, width / image.width) / preparation.crop_fraction
    outer = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left, top = round((outer[0] - width) / 2), round((outer[1] - height) / 2)
    return image.resize(outer, bilinear).crop((left, top, left + width, top + height))


def _point(pixels: np.ndarray, preparation: Preprocessing, layout: str, dtype: np.dtype) -> np.ndarray:
    values = pixels * (preparation.pixel_range / 255.0)
    values = (values - np.asarray(preparation.mean, np.float32)) / np.asarray(preparation.std, np.float32)
    if preparation.channels == "BGR":
        values = values[..., ::-1]
    if layout == "NCHW":
        values = values.transpose(2, 0, 1)
    if not np.issubdtype(dtype, np.floating):
        values = np.clip(np.rint(values), np.iinfo(dtype).min, np.iinfo(dtype).max)
    return values.astype(dtype)


def _recommended(model: onnx.ModelProto, points: np.ndarray) -> int | None:
    """|S| of PFP's bound for this model at this input size (pfp_onnx.pipeline.recommended_points)."""
    input_name = input_specs(model)[0].name
    analysis = analyze(model, {input_name: points[:1]})
    return recommended_points(analysis) if analysis.layers else None


def _points_advice(count: int, recommended: int | None) -> tuple[list[str], list[str]]:
    """A note when the images are enough for PFP's bound, a warning when they are not."""
    if recommended is None:
        return [], []
    scoring = count - max(1, round(count * DEFAULT_HOLDOUT))
    wanted = math.ceil(recommended / (1 - DEFAULT_HOLDOUT))
    said = (f"PFP's bound asks for about {recommended} points for sensitivity; {count} images leave {scoring} "
            f"after compress's default --holdout {DEFAULT_HOLDOUT:g}")
    if scoring >= recommended:
        return [said], []
    return [], [f"{said}: sensitivities from fewer points are less reliable; give about {wanted} images in all"]


def _dims(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in dims) + "]"


def _values(values: Sequence[float]) -> str:
    return ",".join(f"{value:g}" for value in values)
