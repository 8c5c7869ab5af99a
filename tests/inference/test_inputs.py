"""The predictor's image inputs: how they arrive (URL, data URI, local path), how they open, what size they give."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from trainer.inference import inputs
from trainer.inference.inputs import composite, fetch_input, open_input_image, open_mask, output_size
from trainer.tooling.cog_client import FileServer
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS


@pytest.fixture(autouse=True)
def _no_allowance(monkeypatch):
    """No private address is allowed unless a test names its own server."""
    monkeypatch.delenv(ENV_ALLOW_PRIVATE_HOSTS, raising=False)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def _data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# ------------------------------------------------------------------------------------------------------ fetching
def test_a_data_uri_and_a_url_give_the_same_file(tmp_path, monkeypatch):
    data = _png(Image.new("RGB", (40, 30), (10, 200, 30)))
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "start.png").write_bytes(data)
    from_uri = fetch_input(_data_uri(data), "image", tmp_path / "a", allow_local=False)
    with FileServer(tmp_path / "served") as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        from_url = fetch_input(server.url("start.png"), "image", tmp_path / "b", allow_local=False)
    assert from_uri.read_bytes() == from_url.read_bytes() == data


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "localhost"])
def test_an_image_url_at_a_loopback_address_is_refused_and_never_contacted(tmp_path, host):
    """image and mask go through the guarded client: an internal address is refused before any connection, with
    the query string (which may hold a signature) left out of the message."""
    from tests.utils.conftest import ScriptedServer

    internal = ScriptedServer()
    try:
        internal.serve("/start.png", _png(Image.new("RGB", (8, 8))))
        url = internal.url("/start.png", host=host)
        for name in ("image", "mask"):
            with pytest.raises(ValueError, match=rf"^{name}: .*is a loopback address") as refused:
                fetch_input(url + "?X-Amz-Signature=secret", name, tmp_path / name, allow_local=False)
            assert "secret" not in str(refused.value)
        assert internal.connections == 0 and internal.requests == []
        assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a refused fetch leaves nothing"
    finally:
        internal.close()


def test_a_cog_url_path_is_fetched_by_us(tmp_path):
    """cog's URLPath would download without a size cap: its source URL goes through our downloader instead."""
    from cog.types import Path as CogPath

    data = _png(Image.new("RGB", (8, 8)))
    value = CogPath.validate(_data_uri(data))
    assert type(value).__name__ == "URLPath"
    assert fetch_input(value, "mask", tmp_path, allow_local=False).read_bytes() == data


def test_local_paths_only_where_the_operator_allows_them(tmp_path):
    local = tmp_path / "start.png"
    local.write_bytes(_png(Image.new("RGB", (8, 8))))
    with pytest.raises(ValueError, match="image: local paths are not accepted here"):
        fetch_input(str(local), "image", tmp_path / "x", allow_local=False)
    assert fetch_input(str(local), "image", tmp_path / "x", allow_local=True) == local
    with pytest.raises(ValueError, match="image: no such file"):
        fetch_input(str(tmp_path / "missing.png"), "image", tmp_path / "x", allow_local=True)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://example.com/a.png", "image: 'ftp://example.com/a.png' is not an http\\(s\\) URL or a data URI"),
        ("data:image/png;base64", "image: a data URI needs a comma"),
        ("data:image/png;base64,", "image: the data URI is empty"),
        ("data:image/png;base64,@@@@", "image: the data URI's base64 data is corrupt"),
    ],
)
def test_bad_locations_name_the_input(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        fetch_input(value, "image", tmp_path, allow_local=False)


def test_sizes_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_INPUT_BYTES", 1000)
    big = b"x" * 2000
    with pytest.raises(ValueError, match="mask: the data URI is over the limit"):
        fetch_input(_data_uri(big), "mask", tmp_path, allow_local=False)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "big.png").write_bytes(big)
    with FileServer(tmp_path / "served") as server, pytest.raises(ValueError, match=r"image: .*over the limit"):
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        fetch_input(server.url("big.png"), "image", tmp_path / "dl", allow_local=False)
    assert not (tmp_path / "dl" / "image").exists()


# ------------------------------------------------------------------------------------------------------- opening
def test_images_open_as_training_images_do(tmp_path):
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 40 wide, shown 40 high.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rotated.jpg").write_bytes(_png(stored, format="JPEG", exif=exif, quality=95))
    shown = open_input_image(tmp_path / "rotated.jpg", "image")
    assert shown.size == (20, 40) and shown.mode == "RGB"
    # Transparency is composited (on white), palette and grey modes become RGB.
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    (tmp_path / "clear.png").write_bytes(_png(transparent))
    assert np.asarray(open_input_image(tmp_path / "clear.png", "image")).min() == 255
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="image: not an image in a supported format"):
        open_input_image(tmp_path / "notes.png", "image")


def test_the_decompression_bomb_cap_applies(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 100 * 100)
    (tmp_path / "big.png").write_bytes(_png(Image.new("L", (200, 200))))
    with pytest.raises(ValueError, match=r"image: 200×200 pixels .* is over the limit"):
        open_input_image(tmp_path / "big.png", "image")


def test_masks_are_greyscale_and_as_large_as_the_image(tmp_path):
    grey = Image.new("L", (32, 24), 0)
    grey.paste(255, (8, 8, 24, 16))
    (tmp_path / "mask.png").write_bytes(_png(grey))
    mask = open_mask(tmp_path / "mask.png", (32, 24))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(grey))
    # An RGB file of grey pixels (as masks are often saved) is greyscale too, JPEG noise included.
    (tmp_path / "rgb.jpg").write_bytes(_png(grey.convert("RGB"), format="JPEG", quality=90))
    assert open_mask(tmp_path / "rgb.jpg", (32, 24)).size == (32, 24)

    with pytest.raises(ValueError, match="mask: 32×24 does not match the image's 64×48"):
        open_mask(tmp_path / "mask.png", (64, 48))
    coloured = grey.convert("RGB")
    coloured.paste((255, 0, 0), (0, 0, 4, 4))
    (tmp_path / "red.png").write_bytes(_png(coloured))
    with pytest.raises(ValueError, match=r"mask: must be greyscale .* but it has colours"):
        open_mask(tmp_path / "red.png", (32, 24))


def test_transparent_parts_of_a_mask_are_kept(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 8, 16))
    (tmp_path / "mask.png").write_bytes(_png(rgba))
    mask = np.asarray(open_mask(tmp_path / "mask.png", (16, 16)))
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()


# ---------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("image", "width", "height", "expected"),
    [
        ((640, 480), None, None, (640, 480)),
        ((643, 481), None, None, (640, 480)),  # rounded to multiples of 8
        ((4000, 3000), None, None, (2048, 1536)),  # scaled down to the side limit
        ((640, 480), 320, None, (320, 240)),  # one side given: the other keeps the aspect ratio
        ((640, 480), None, 240, (320, 240)),
        ((640, 480), 512, 512, (512, 512)),
        ((48, 32), None, None, (96, 64)),  # scaled up to the smallest side allowed
        ((30, 3000), None, None, (64, 2048)),  # both bounds: the aspect ratio gives way
    ],
)
def test_output_size_follows_the_image(image, width, height, expected):
    assert output_size(image, width, height, max_side=2048) == expected


def test_composite_takes_white_from_the_generated_and_black_from_the_original():
    generated, original = Image.new("RGB", (4, 1), (200, 0, 0)), Image.new("RGB", (4, 1), (0, 0, 100))
    mask = Image.frombytes("L", (4, 1), bytes([0, 255, 128, 0]))
    result = np.asarray(composite(generated, original, mask))
    assert result[0, 0].tolist() == [0, 0, 100] and result[0, 1].tolist() == [200, 0, 0]
    assert 90 < result[0, 2, 0] < 110, "grey blends"
