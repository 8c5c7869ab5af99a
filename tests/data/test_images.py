"""Decoding user images: formats, orientation, transparency, colour modes and the pixel cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from tests.data.factories import bomb_png_header, encode, photo, swapped_primaries_icc
from trainer.data.images import ImageReadError, open_image, oriented_size, to_rgb


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "a.jpg"), ("PNG", "a.png"), ("WEBP", "a.webp"), ("BMP", "a.bmp"),
                                           ("TIFF", "a.tiff")])
def test_common_formats_decode_to_rgb(tmp_path, fmt, name):
    source = photo(90, 70, seed=1)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    loaded = open_image(_write(tmp_path, name, encode(source, fmt, **options)))
    assert loaded.image.mode == "RGB" and loaded.image.size == (90, 70) and loaded.alpha is None
    difference = np.abs(np.asarray(loaded.image, dtype=int) - np.asarray(source, dtype=int)).mean()
    assert difference < 12 if options else difference == 0  # lossy formats lose the noise, lossless nothing


def test_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (80, 80), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = open_image(_write(tmp_path, "anim.gif", buffer.getvalue()))
    red, _green, blue = loaded.image.getpixel((40, 40))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied(tmp_path):
    source = photo(120, 60, seed=2)  # landscape pixels...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...shown rotated 90° clockwise: portrait
    path = _write(tmp_path, "rotated.jpg", encode(source, "JPEG", exif=exif.tobytes(), quality=95))
    loaded = open_image(path)
    assert loaded.image.size == (60, 120)
    assert oriented_size(path) == (60, 120)
    expected = source.transpose(Image.Transpose.ROTATE_270)
    assert np.abs(np.asarray(loaded.image, dtype=int) - np.asarray(expected, dtype=int)).mean() < 8


def test_transparency_becomes_white_background_and_mask(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (16, 16, 48, 48))
    loaded = open_image(_write(tmp_path, "cutout.png", encode(rgba, "PNG")))
    assert loaded.image.getpixel((2, 2)) == (255, 255, 255)
    assert loaded.image.getpixel((32, 32)) == (200, 10, 10)
    assert loaded.alpha is not None and loaded.alpha.getpixel((2, 2)) == 0 and loaded.alpha.getpixel((32, 32)) == 255


def test_palette_with_transparency_and_opaque_alpha(tmp_path):
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    palette.info["transparency"] = 0
    loaded = open_image(_write(tmp_path, "p.png", encode(palette, "PNG", transparency=0)))
    assert loaded.image.getpixel((10, 10)) == (10, 200, 30) and loaded.image.getpixel((50, 10)) == (255, 255, 255)
    assert loaded.alpha is not None
    opaque = Image.new("RGBA", (64, 64), (5, 6, 7, 255))
    assert open_image(_write(tmp_path, "opaque.png", encode(opaque, "PNG"))).alpha is None


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in print colours
    loaded = open_image(_write(tmp_path, "print.jpg", encode(cmyk, "JPEG", quality=95)))
    red, green, blue = loaded.image.getpixel((32, 32))
    assert loaded.image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    values = np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64)
    grey16 = Image.fromarray(values)
    assert grey16.mode.startswith("I;16")
    loaded = open_image(_write(tmp_path, "deep.png", encode(grey16, "PNG")))
    array = np.asarray(loaded.image)
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == 255  # the full range, not clipped at 255
    assert 120 < array[32, 32, 0] < 135 and (array[..., 0] == array[..., 1]).all()
    # A dark 16-bit image stays dark (no stretching to its own maximum).
    dark = Image.fromarray(np.full((64, 64), 4096, dtype=np.uint16))
    assert np.asarray(to_rgb(dark)[0])[0, 0, 0] == 16


def test_grey_and_bilevel_images(tmp_path):
    assert open_image(_write(tmp_path, "g.png", encode(Image.new("L", (64, 64), 77), "PNG"))).image.getpixel(
        (1, 1)) == (77, 77, 77)
    assert open_image(_write(tmp_path, "b.bmp", encode(Image.new("1", (64, 64), 1), "BMP"))).image.getpixel(
        (1, 1)) == (255, 255, 255)


def test_icc_profiles_are_converted_to_srgb(tmp_path):
    source = Image.new("RGB", (64, 64), (180, 90, 40))
    plain = open_image(_write(tmp_path, "plain.png", encode(source, "PNG"))).image.getpixel((5, 5))
    tagged = encode(source, "PNG", icc_profile=swapped_primaries_icc())
    red, _green, blue = open_image(_write(tmp_path, "tagged.png", tagged)).image.getpixel((5, 5))
    assert plain == (180, 90, 40)
    assert blue > 150 and red < 70  # the profile says these values mean blue-ish orange, mirrored
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same = open_image(_write(tmp_path, "srgb.png", encode(source, "PNG", icc_profile=srgb))).image.getpixel((5, 5))
    assert max(abs(a - b) for a, b in zip(same, plain, strict=True)) <= 2
    broken = encode(source, "PNG", icc_profile=b"not a profile at all")
    assert open_image(_write(tmp_path, "broken.png", broken)).image.getpixel((5, 5)) == plain


def test_heic_when_pillow_heif_is_present(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    source = photo(96, 64, seed=4)
    heif = pillow_heif.from_pillow(source)
    buffer = io.BytesIO()
    heif.save(buffer, quality=90)
    loaded = open_image(_write(tmp_path, "phone.heic", buffer.getvalue()))
    assert loaded.image.size == (96, 64)


def test_pixel_cap_is_checked_before_decoding(tmp_path):
    with pytest.raises(ImageReadError, match=r"bomb.png: 12000×11000 pixels \(132 MP\) is over the limit of 120 MP"):
        open_image(_write(tmp_path, "bomb.png", bomb_png_header(12_000, 11_000)))
    with pytest.raises(ImageReadError, match="over the limit of 1 MP"):
        open_image(_write(tmp_path, "big.png", encode(photo(1200, 1000), "PNG")), max_pixels=1_000_000)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("empty.jpg", b"", "not an image"),
        ("text.png", b"hello, I am text", "not an image"),
        ("cut.png", encode(photo(64, 64), "PNG")[:300], "truncated or corrupt"),
        ("cut.jpg", encode(photo(64, 64), "JPEG")[:500], "truncated or corrupt"),
        ("eps.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    ],
)
def test_broken_files_raise_a_named_error(tmp_path, name, data, fragment):
    with pytest.raises(ImageReadError) as error:
        open_image(_write(tmp_path, name, data), label=f"{name} (in upload.zip)")
    assert str(error.value).startswith(f"{name} (in upload.zip): ") and fragment in str(error.value)


# ------------------------------------------------------------------------------------------- decode memory
_PEAK_SCRIPT = """
import resource, sys
from trainer.data.images import open_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = open_image(sys.argv[1], draft_size=(1024, 1024), reduce_to=(1024, 1024))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, loaded.image.size[0], loaded.image.size[1], loaded.full_size[0], loaded.full_size[1])
"""


@pytest.mark.parametrize(("mode", "dtype", "bytes_per_pixel"), [("I;16", np.uint16, 2), ("F", np.float32, 4)])
def test_decoding_a_deep_image_peaks_near_its_frame(tmp_path, mode, dtype, bytes_per_pixel):
    """The issue's case, scaled: a 48 MP 16-bit (or float) image of a few hundred KiB. Peak memory, measured in a
    fresh process, stays within 2.5 times the decoded frame (the old whole-image float64 conversions took 13 times
    it); conversions work on the reduced working copy."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    height, width = 6000, 8000
    array = np.zeros((height, width), dtype=dtype)
    array[::7, ::5] = 40000 if dtype == np.uint16 else 0.6
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    del array
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, out_w, out_h, full_w, full_h = (int(v) for v in result.stdout.split())
    frame = width * height * bytes_per_pixel
    assert (full_w, full_h) == (width, height) and (out_w, out_h) == (4000, 3000)
    assert peak < 2.5 * frame, f"decoding took {peak / 2**20:.0f} MiB for a {frame / 2**20:.0f} MiB frame"


def test_reduction_keeps_the_picture(tmp_path):
    """The reduced working copy is the box average of the frame, turned by its orientation afterwards."""
    image = photo(1600, 1200, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the picture is 1200 wide, 1600 high
    path = tmp_path / "turned.png"
    image.save(path, exif=exif)
    loaded = open_image(path, reduce_to=(300, 300))
    assert loaded.full_size == (1200, 1600) and loaded.image.size == (600, 800)
    expected = image.reduce(2).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(expected))
