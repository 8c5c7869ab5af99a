"""Builders for the data tests: photos, archives (friendly and hostile) and configs, all made on the spot."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.config.schema import TrainingConfig
from trainer.data.limits import DataLimits

MiB = 1 << 20


def photo(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A distinct, textured RGB picture: gradients, a few shapes and noise (not flat, so saliency has work)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, rng.uniform(40, 200))], axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, min(width, height) / 3)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    base += rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int = 0, width: int = 160, height: int = 120) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=90)


def png(seed: int = 0, width: int = 160, height: int = 120) -> bytes:
    return encode(photo(width, height, seed), "PNG")


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with_links(path: Path) -> Path:
    """A tar holding one good image, a symbolic link and a hard link pointing outside, and a device file."""
    with tarfile.open(path, "w") as archive:
        good = png(1)
        info = tarfile.TarInfo("good.png")
        info.size = len(good)
        archive.addfile(info, io.BytesIO(good))
        link = tarfile.TarInfo("escape_symlink.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
        hard = tarfile.TarInfo("escape_hardlink.png")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "../../outside.png"
        archive.addfile(hard)
        device = tarfile.TarInfo("device_node")
        device.type = tarfile.CHRTYPE
        archive.addfile(device)
    return path


def zip_with_symlink(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.png", png(2))
        info = zipfile.ZipInfo("link_to_etc.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return path


def encrypted_zip(path: Path) -> Path:
    """A zip whose members carry the 'encrypted' flag, as password-protected zips do (in both headers)."""
    data = bytearray(zip_bytes({"secret.png": png(3)}))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 6] |= 0x1  # general purpose flag of the local header
    data[central + 8] |= 0x1  # and of the central directory entry
    path.write_bytes(bytes(data))
    return path


def zip_bomb(path: Path, size: int = 48 * MiB) -> Path:
    """A small zip that unpacks to ``size`` bytes of zeros (ratio about 1000:1)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("zeros.bmp", "w", force_zip64=True) as member:
        block = bytes(MiB)
        for _ in range(size // MiB):
            member.write(block)
    return path


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


@dataclass
class RawMember:
    """One member of a hand-built zip: its name, its deflated data, and the size and CRC of what that inflates to."""

    name: str
    packed: bytes
    size: int
    crc: int

    @classmethod
    def of(cls, name: str, data: bytes) -> RawMember:
        return cls(name, raw_deflate(data), len(data), zlib.crc32(data))


def handmade_zip(members: list[RawMember], central: list[tuple[int, int | None]] | None = None) -> bytes:
    """A zip written byte by byte: local headers and data for ``members``, then a central directory whose entries are
    ``central`` (member index, compressed size override): several entries may point at one member, or claim more data
    than it has (overlapping entries, as zip bombs and parser-confusion attacks build them)."""
    out = bytearray()
    offsets = []
    for member in members:
        name = member.name.encode()
        offsets.append(len(out))
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, member.crc, len(member.packed),
                           member.size, len(name), 0) + name + member.packed
    start = len(out)
    entries = central if central is not None else [(i, None) for i in range(len(members))]
    for index, packed_size in entries:
        member = members[index]
        name = member.name.encode()
        out += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, member.crc,
                           packed_size if packed_size is not None else len(member.packed), member.size, len(name), 0,
                           0, 0, 0, 0, offsets[index]) + name
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(out) - start, start, 0)
    return bytes(out)


def lying_zip(path: Path, declared: int) -> Path:
    """A zip whose headers claim its member is ``declared`` bytes long (the total-size cap must hold anyway)."""
    data = bytearray(zip_bytes({"big.png": png(4)}, compression=zipfile.ZIP_STORED))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 22:local + 26] = declared.to_bytes(4, "little")
    data[central + 24:central + 28] = declared.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def tar_bomb(path: Path, size: int = 48 * MiB) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("zeros.raw")
        info.size = size
        archive.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def traversal_zip(path: Path, outside: Path) -> Path:
    """Members that try to leave the extraction folder: '..', absolute paths, a Windows drive, backslashes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok/inside.png", png(5))
        archive.writestr("../../escaped_dotdot.png", png(6))
        archive.writestr(str(outside / "escaped_absolute.png"), png(7))
        archive.writestr("C:/Windows/escaped_drive.png", png(8))
        archive.writestr("..\\..\\escaped_backslash.png", png(9))
    return path


def bomb_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels: decoding it would need gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def config(sources, **overrides) -> TrainingConfig:
    values = {
        "lora_training_urls": sources if isinstance(sources, (str, list)) else str(sources),
        "concept_mode": "object",
        "caption_model": "no_caption",
        "resolution": 128,
        "augment_imgs_up_to_n": 0,
        "seed": 0,
    }
    values.update(overrides)
    return TrainingConfig(**values)


def fast_limits(**overrides) -> DataLimits:
    """Limits that make failures quick in tests (one retry, short timeouts, small caps)."""
    values = {
        "http_retries": 1,
        "http_backoff": 0.01,
        "http_timeout": (2.0, 1.0),
        "max_total_bytes": 32 * MiB,
        "ratio_check_min_bytes": 1 * MiB,
    }
    values.update(overrides)
    return DataLimits(**values)


@dataclass
class Sandbox:
    """A test's files: ``work_dir`` is the run folder; everything else under ``base`` must stay as it was."""

    base: Path
    work_dir: Path
    inputs: Path
    temp: Path

    def snapshot(self) -> dict[str, tuple[int, int]]:
        state = {}
        for directory, _dirs, files in os.walk(self.base):
            if Path(directory) == self.work_dir or self.work_dir in Path(directory).parents:
                continue
            for name in files:
                path = Path(directory, name)
                info = path.lstat()
                state[str(path)] = (info.st_size, info.st_mtime_ns)
        return state

    def assert_nothing_written_outside(self, before: dict[str, tuple[int, int]]) -> None:
        after = self.snapshot()
        added = sorted(set(after) - set(before))
        changed = sorted(p for p in before if p in after and after[p] != before[p])
        assert not added, f"files written outside the work folder: {added}"
        assert not changed, f"files changed outside the work folder: {changed}"
        # torch keeps its kernel cache in the temp folder (torchinductor_<user>): the framework's, not ours.
        left = [p for p in self.temp.iterdir() if not p.name.startswith("torchinductor_")]
        assert not left, f"temporary files left behind: {left}"


def make_sandbox(tmp_path: Path, monkeypatch) -> Sandbox:
    base = tmp_path / "sandbox"
    box = Sandbox(base=base, work_dir=base / "run", inputs=base / "inputs", temp=base / "tmp")
    for folder in (box.inputs, box.temp):
        folder.mkdir(parents=True)
    # Anything that writes through tempfile lands where the test can see it.
    monkeypatch.setattr(tempfile, "tempdir", str(box.temp))
    return box


def swapped_primaries_icc() -> bytes:
    """A matrix/TRC ICC v2 display profile whose red and blue primaries are sRGB's blue and red.

    An image tagged with it shows red where its pixel values say blue: a converter that honours profiles swaps the
    channels, one that ignores them does not.
    """
    import struct

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    description = b"swapped primaries\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(description)) + description + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233) + bytes(2)  # gamma 2.2 (u8Fixed8), padded to 4
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*blue)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*red)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, payload in tags:
        payload += bytes(-len(payload) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(payload))
        data += payload
    size = offset + len(data)
    header = struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
    header += b"acsp" + bytes(4 + 4 + 4 + 4 + 8 + 4) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(4)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data
