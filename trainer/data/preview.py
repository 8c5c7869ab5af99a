"""A contact sheet of the prepared training set: each crop, its mask as a red veil over what the loss ignores,
its caption and its training size. People debug datasets by looking, not by reading logs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from trainer.data.manifest import PreparedDataset
from trainer.utils.atomic import atomic_path

PREVIEW_NAME = "dataset_preview.jpg"
TILE = 256
MAX_TILES = 64
MAX_COLUMNS = 8
CAPTION_LINES = 4
PAD = 8
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
MUTED = (150, 150, 160)
VEIL = np.array([220.0, 30.0, 30.0])
#: Opacity of the veil where the mask is 0 (nothing of it where the mask is 255).
VEIL_OPACITY = 0.6


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if font.getlength(trial) <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:  # one word wider than the tile
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def overlay_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Veil the parts of ``image`` that the mask leaves out, in proportion to how much it leaves them out."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = np.asarray(mask.convert("L").resize(image.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    alpha = (VEIL_OPACITY * (1.0 - weight))[..., None]
    blended = rgb * (1.0 - alpha) + VEIL * alpha
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def write_contact_sheet(dataset: PreparedDataset, target: Path, title: str = "") -> Path:
    """Write the contact sheet of ``dataset`` to ``target`` (JPEG) and return the path."""
    samples = dataset.samples[:MAX_TILES]
    n = len(samples)
    columns = max(1, min(MAX_COLUMNS, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / columns))
    small, normal = _font(11), _font(13)
    line_h = int(normal.getbbox("Ag")[3]) + 3
    cell_w = TILE + 2 * PAD
    cell_h = TILE + PAD * 2 + line_h * (CAPTION_LINES + 1)
    footer = f"... and {len(dataset.samples) - n} more" if len(dataset.samples) > n else ""
    title_lines = _wrap(title, normal, columns * cell_w - 2 * PAD, 3) if title else []
    header_h = PAD + line_h * len(title_lines) + (PAD if title_lines else 0)
    footer_h = line_h + PAD if footer else 0
    sheet = Image.new("RGB", (columns * cell_w, header_h + rows * cell_h + footer_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=TEXT, font=normal)
    for index, sample in enumerate(samples):
        x0 = (index % columns) * cell_w + PAD
        y0 = header_h + (index // columns) * cell_h + PAD
        with Image.open(dataset.root / sample.image) as opened:
            tile = opened.convert("RGB")
        mask_path = dataset.mask_path(index)
        if mask_path is not None and mask_path.is_file():
            with Image.open(mask_path) as mask:
                tile = overlay_mask(tile, mask)
        tile.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x0 + (TILE - tile.width) // 2, y0 + (TILE - tile.height) // 2))
        height, width = sample.target_size
        # ASCII only: the bundled default font lacks symbols such as ×.
        label = f"#{index}  {width}x{height}" + ("  augmented" if sample.augmented else "")
        draw.text((x0, y0 + TILE + 4), label, fill=MUTED, font=small)
        for line_no, line in enumerate(_wrap(sample.caption, normal, TILE, CAPTION_LINES)):
            draw.text((x0, y0 + TILE + 4 + line_h * (line_no + 1)), line, fill=TEXT, font=normal)
    if footer:
        draw.text((PAD, sheet.height - footer_h), footer, fill=MUTED, font=normal)
    with atomic_path(target) as tmp:
        sheet.save(tmp, format="JPEG", quality=88)
    return target
