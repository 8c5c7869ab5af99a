"""The hostile corpus: archives and files built to escape, explode or crash. Each gets a clear message naming it,
and nothing is ever written outside the run's work folder."""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile

import pytest

from tests.data.factories import (
    MiB,
    RawMember,
    bomb_png_header,
    config,
    encrypted_zip,
    fast_limits,
    handmade_zip,
    jpeg,
    lying_zip,
    png,
    tar_bomb,
    tar_bytes,
    tar_with_links,
    traversal_zip,
    zip_bomb,
    zip_bytes,
    zip_with_symlink,
)
from trainer.data.errors import ArchiveError, DataError, SourceError
from trainer.data.limits import DataLimits
from trainer.data.prepare import SCRATCH_DIR, prepare_dataset


def _prepare(sandbox, source, limits=None, **overrides):
    return prepare_dataset(config(source, **overrides), sandbox.work_dir, limits=limits or fast_limits())


def _expect_error(sandbox, source, error_type, *fragments, limits=None):
    before = sandbox.snapshot()
    with pytest.raises(error_type) as caught:
        _prepare(sandbox, source, limits)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    sandbox.assert_nothing_written_outside(before)
    assert not (sandbox.work_dir / SCRATCH_DIR).exists()
    assert not (sandbox.work_dir / "dataset").exists()
    return message


def test_path_traversal_members_are_skipped_and_named(sandbox, caplog):
    archive = traversal_zip(sandbox.inputs / "escape.zip", outside=sandbox.base)
    before = sandbox.snapshot()
    with caplog.at_level(logging.WARNING):
        dataset = _prepare(sandbox, archive)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 1 and dataset.samples[0].source == "ok/inside.png (in " + str(archive) + ")"
    warnings = " ".join(dataset.info["warnings"])
    for name in ("../../escaped_dotdot.png", "escaped_absolute.png", "C:/Windows/escaped_drive.png",
                 "..\\..\\escaped_backslash.png"):
        assert name in warnings
    assert "path goes up" in warnings and "absolute path" in warnings
    for leaked in ("escaped_dotdot.png", "escaped_absolute.png", "escaped_backslash.png"):
        assert not list(sandbox.base.parent.rglob(leaked))
    assert "escape.zip" in caplog.text


def test_links_and_device_files_in_tar_are_skipped(sandbox):
    archive = tar_with_links(sandbox.inputs / "links.tar")
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, archive)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 1
    warnings = " ".join(dataset.info["warnings"])
    assert "escape_symlink.png" in warnings and "symbolic link" in warnings
    assert "escape_hardlink.png" in warnings and "hard link" in warnings
    assert "device_node" in warnings and "not a regular file" in warnings


def test_symlink_members_in_zip_are_skipped(sandbox):
    archive = zip_with_symlink(sandbox.inputs / "links.zip")
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, archive)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 1
    assert any("link_to_etc.png" in w and "symbolic link" in w for w in dataset.info["warnings"])


def test_password_protected_zip(sandbox):
    archive = encrypted_zip(sandbox.inputs / "secret.zip")
    _expect_error(sandbox, archive, ArchiveError, "secret.zip", "password-protected")


def test_zip_bomb_by_ratio(sandbox):
    archive = zip_bomb(sandbox.inputs / "bomb.zip")
    assert archive.stat().st_size < MiB
    _expect_error(sandbox, archive, ArchiveError, "zeros.bmp", "bomb.zip", "zip bomb",
                  limits=fast_limits(max_total_bytes=1 << 30))


def test_zip_bomb_by_total_size(sandbox):
    archive = zip_bomb(sandbox.inputs / "bomb.zip")
    _expect_error(sandbox, archive, ArchiveError, "bomb.zip", "unpacks to 48.0 MiB", limits=fast_limits())


def test_zip_whose_header_lies_about_size(sandbox):
    archive = lying_zip(sandbox.inputs / "liar.zip", declared=3_000_000_000)
    _expect_error(sandbox, archive, ArchiveError, "liar.zip", "over the limit")


def test_tar_bomb_by_ratio_and_by_size(sandbox):
    archive = tar_bomb(sandbox.inputs / "bomb.tar.gz")
    _expect_error(sandbox, archive, ArchiveError, "bomb.tar.gz", "tar bomb",
                  limits=fast_limits(max_total_bytes=1 << 30))
    _expect_error(sandbox, archive, ArchiveError, "bomb.tar.gz", "unpacks to more than", limits=fast_limits())


def test_too_many_entries(sandbox):
    archive = sandbox.inputs / "many.zip"
    archive.write_bytes(zip_bytes({f"f{i}.txt": b"x" for i in range(30)}))
    _expect_error(sandbox, archive, ArchiveError, "many.zip", "30 entries", limits=fast_limits(max_archive_entries=20))


@pytest.mark.parametrize(
    ("name", "payload", "fragments"),
    [
        ("truncated.zip", lambda: zip_bytes({f"{i}.png": png(i) for i in range(3)})[:-200],
         ("truncated.zip", "not a readable zip archive")),
        ("truncated.tar.gz", lambda: tar_bytes({f"{i}.png": png(i) for i in range(3)})[:600],
         ("truncated.tar.gz", "truncated or corrupt")),
        ("not-a-tar.gz", lambda: __import__("gzip").compress(b"just some text, not a tar archive" * 20),
         ("not-a-tar.gz", "not a readable tar archive")),
        ("garbage.tar.xz", lambda: b"\xfd7zXZ\x00" + bytes(range(256)) * 4,
         ("garbage.tar.xz", "xz file that is not a readable tar archive")),
        ("photos.7z", lambda: b"7z\xbc\xaf\x27\x1c" + bytes(64), ("photos.7z", "7z archives are not supported")),
        ("photos.rar", lambda: b"Rar!\x1a\x07\x00" + bytes(64), ("photos.rar", "RAR archives are not supported")),
    ],
)
def test_corrupt_and_unsupported_archives(sandbox, name, payload, fragments):
    path = sandbox.inputs / name
    path.write_bytes(payload())
    error_type = SourceError if name.endswith((".7z", ".rar")) else ArchiveError
    _expect_error(sandbox, path, error_type, *fragments)


def test_corrupt_member_is_skipped_and_the_rest_kept(sandbox):
    data = bytearray(zip_bytes({"good.png": png(1), "bad.png": png(2)}, compression=zipfile.ZIP_STORED))
    # Flip bytes inside the second member's data: its CRC no longer matches.
    start = data.find(b"bad.png") + len("bad.png") + 40
    data[start:start + 8] = bytes(8)
    archive = sandbox.inputs / "crc.zip"
    archive.write_bytes(bytes(data))
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, archive)
    sandbox.assert_nothing_written_outside(before)
    assert [s.source.split(" ")[0] for s in dataset.samples] == ["good.png"]
    assert any("bad.png" in w and ("corrupt" in w or "CRC" in w) for w in dataset.info["warnings"])


def test_hostile_images_inside_an_archive_are_skipped_by_name(sandbox):
    archive = sandbox.inputs / "mixed.zip"
    archive.write_bytes(zip_bytes({
        "good.jpg": jpeg(1),
        "bomb.png": bomb_png_header(40_000, 40_000),
        "truncated.jpg": jpeg(2)[:400],
        "notes.pdf": b"%PDF-1.4 not an image",
        "tiny.png": png(3, width=20, height=20),
        "__MACOSX/._good.jpg": b"\x00\x05\x16\x07 resource fork",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "readme.md": b"# my photos",
    }))
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, archive)
    sandbox.assert_nothing_written_outside(before)
    assert [s.source.split(" ")[0] for s in dataset.samples] == ["good.jpg"]
    warnings = dataset.info["warnings"]
    assert any("bomb.png" in w and "over the limit of 120 MP" in w for w in warnings)
    assert any("truncated.jpg" in w and "truncated or corrupt" in w for w in warnings)
    assert any("notes.pdf" in w and "not an image" in w for w in warnings)
    assert any("tiny.png" in w and "too small" in w for w in warnings)
    assert not any("._good" in w or "DS_Store" in w or "readme" in w for w in warnings)


def test_nothing_usable_is_a_clear_error_listing_why(sandbox):
    archive = sandbox.inputs / "useless.zip"
    archive.write_bytes(zip_bytes({"a.pdf": b"%PDF-1.4", "b.jpg": b"\xff\xd8\xff garbage"}))
    message = _expect_error(sandbox, archive, DataError, "no usable training images", "a.pdf", "b.jpg")
    assert "Traceback" not in message


def test_nested_archives_unpack_to_the_depth_limit(sandbox):
    innermost = zip_bytes({"deep.png": png(9)})
    inner = zip_bytes({"inner.png": png(8), "innermost.zip": innermost})
    outer = tar_bytes({"outer.png": png(7), "nested/inner.zip": inner})
    archive = sandbox.inputs / "outer.tgz"
    archive.write_bytes(outer)
    dataset = _prepare(sandbox, archive)
    names = sorted(s.source.split(" ")[0] for s in dataset.samples)
    assert names == ["inner.png", "outer.png"]
    assert any("innermost.zip" in w and "nested more than 2 deep" in w for w in dataset.info["warnings"])
    dataset = prepare_dataset(config(archive), sandbox.work_dir, limits=fast_limits(max_archive_depth=3), reuse=False)
    assert sorted(s.source.split(" ")[0] for s in dataset.samples) == ["deep.png", "inner.png", "outer.png"]


def test_duplicates_are_removed_by_content(sandbox):
    same = png(1)
    archive = sandbox.inputs / "dups.zip"
    archive.write_bytes(zip_bytes({"a.png": same, "copy/a-again.png": same, "b.png": png(2)}))
    dataset = _prepare(sandbox, archive)
    assert len(dataset) == 2 and dataset.info["duplicates_removed"] == 1


def test_more_images_than_the_maximum(sandbox):
    archive = sandbox.inputs / "many.zip"
    archive.write_bytes(zip_bytes({f"{i}.png": png(i, 64, 64) for i in range(4)}))
    before = sandbox.snapshot()
    with pytest.raises(DataError, match=r"more than 3 images, the maximum \(max_train_images\)"):
        prepare_dataset(config(archive, max_train_images=3), sandbox.work_dir, limits=fast_limits(max_images=3))
    sandbox.assert_nothing_written_outside(before)


def test_zip_members_with_control_characters_and_long_names(sandbox):
    long_name = "x" * 300 + ".png"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("bad\x07name.png", png(1))
        archive.writestr(long_name, png(2))
        archive.writestr("dir/", b"")
        archive.writestr("dir", png(3))  # a file with the same name as a folder
    path = sandbox.inputs / "names.zip"
    path.write_bytes(buffer.getvalue())
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, path)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 3


def test_undecodable_and_overlong_member_names(sandbox):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", encoding="latin-1") as archive:
        for name, data in (("café\x1b[31m.png", png(1)), ("a/" * 100 + "deep.png", png(2)), ("ok.png", png(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path = sandbox.inputs / "names.tar"
    path.write_bytes(buffer.getvalue())
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, path)
    sandbox.assert_nothing_written_outside(before)
    assert len(dataset) == 2
    assert all("\x1b" not in s.source and s.source.isprintable() for s in dataset.samples)
    assert any("deep.png" in w and "too long" in w for w in dataset.info["warnings"])
    dataset.save()  # the manifest holds the names as valid text


def test_credentials_inside_s3_urls_are_refused_unprinted(sandbox):
    _expect_error(sandbox, "s3://AKIAIOSFODNN7:wJalrSECRET@bucket/photos.zip", SourceError, "not supported")
    with pytest.raises(SourceError) as error:
        _prepare(sandbox, "s3://AKIAIOSFODNN7:wJalrSECRET@bucket/photos.zip")
    assert "wJalrSECRET" not in str(error.value) and "AKIAIOSFODNN7" not in str(error.value)


@pytest.mark.parametrize(("mode", "name"), [("w", "set.tar"), ("w:gz", "set.tar.gz"), ("w:bz2", "set.tar.bz2"),
                                            ("w:xz", "set.txz")])
def test_every_tar_flavour_unpacks(sandbox, mode, name):
    path = sandbox.inputs / name
    path.write_bytes(tar_bytes({"photos/a.png": png(1), "photos/a.txt": b"a caption from the tar"}, mode=mode))
    dataset = _prepare(sandbox, path)
    assert [s.caption for s in dataset.samples] == ["TOK, a caption from the tar"]


# ------------------------------------------------------------------------------------- bombs that look harmless
def test_many_members_each_under_the_ratio_check_are_a_bomb_together(sandbox):
    """The issue's case: 64 members of 31 MiB zeros in a 2 MiB zip (2 GiB), each below the per-member check."""
    zeros = RawMember.of("zeros.bin", bytes(31 * MiB))
    members = [RawMember(f"part{i:02d}.bmp", zeros.packed, zeros.size, zeros.crc) for i in range(64)]
    archive = sandbox.inputs / "quiet-bomb.zip"
    archive.write_bytes(handmade_zip(members))
    assert archive.stat().st_size < 3 * MiB
    message = _expect_error(sandbox, archive, ArchiveError, "quiet-bomb.zip", "unpacks to 1.9 GiB from",
                            "zip bomb", limits=DataLimits(max_total_bytes=16 << 30))
    assert "part00" not in message  # no single member is to blame: the archive as a whole is


def test_central_directory_entries_pointing_at_one_member_are_refused(sandbox):
    """The issue's case: a 61 KiB zip whose central directory names one member 64 times."""
    member = RawMember.of("photo.png", png(1, 320, 240))
    archive = sandbox.inputs / "echo.zip"
    archive.write_bytes(handmade_zip([member], central=[(0, None)] * 64))
    _expect_error(sandbox, archive, ArchiveError, "echo.zip", "point at the same data", "photo.png")


def test_overlapping_central_directory_entries_are_refused(sandbox):
    first, second = RawMember.of("a.png", png(1)), RawMember.of("b.png", png(2))
    archive = sandbox.inputs / "overlap.zip"
    # a.png claims more compressed bytes than it has: its data would run into b.png's header.
    archive.write_bytes(handmade_zip([first, second], central=[(0, len(first.packed) + 64), (1, None)]))
    _expect_error(sandbox, archive, ArchiveError, "overlap.zip", "overlap", "a.png")


def test_duplicate_names_are_renamed_in_linear_time(sandbox, monkeypatch):
    """2,500 members of one name: each gets its own file without probing the disk name after name."""
    import pathlib

    members = [RawMember.of("same.txt", f"caption {i}".encode()) for i in range(2500)]
    archive = sandbox.inputs / "same.zip"
    archive.write_bytes(handmade_zip(members))
    probes = []
    real_exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda self, *a, **k: probes.append(1) or real_exists(self, *a, **k))
    from trainer.data.ingest.archives import unpack_untrusted

    report = unpack_untrusted(archive, sandbox.work_dir / "out", "same.zip", DataLimits())
    written = sorted(p.name for p in (sandbox.work_dir / "out").iterdir())
    assert len(written) == 2500 and written[:3] == ["same.txt", "same~10.txt", "same~100.txt"]
    assert report.counts["skipped"] == 0
    assert len(probes) < 100, f"{len(probes)} existence probes for 2,500 members"


def test_a_file_clashing_with_a_folder_is_skipped_by_name(sandbox):
    archive = sandbox.inputs / "clash.zip"
    archive.write_bytes(zip_bytes({"a.png": png(1), "a.png/b.png": png(2), "dir/c.png": png(3), "dir": png(4)}))
    dataset = _prepare(sandbox, archive)
    assert sorted(s.source.split(" ")[0] for s in dataset.samples) == ["a.png", "dir/c.png", "dir~2"]
    assert any("a.png/b.png" in w and "inside a file of the same name" in w for w in dataset.info["warnings"])


def test_a_huge_gnu_long_name_is_refused_before_it_is_read(sandbox):
    """The issue's case: a tar header announcing a 64 MiB name; tarfile would read it all into memory."""
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = 64 * MiB
    payload = header.tobuf(format=tarfile.GNU_FORMAT) + b"a" * (64 * MiB) + bytes(512)
    archive = sandbox.inputs / "longname.tar.gz"
    archive.write_bytes(__import__("gzip").compress(payload, compresslevel=1))
    message = _expect_error(sandbox, archive, ArchiveError, "longname.tar.gz", "64.0 MiB header record",
                            limits=fast_limits(max_total_bytes=1 << 30))
    assert "aaaa" not in message


def test_files_created_are_capped_across_nested_archives(sandbox):
    """The issue's case, scaled down: copies of an inner zip of empty files; every file counts, empty or not."""
    inner = zip_bytes({f"empty{i:04d}.txt": b"" for i in range(100)})
    archive = sandbox.inputs / "copies.zip"
    archive.write_bytes(zip_bytes({f"copy{i}.zip": inner for i in range(5)}))
    _expect_error(sandbox, archive, DataError, "more than 300 files in total", "nested archives count too",
                  limits=fast_limits(max_total_files=300))


def test_the_byte_budget_is_one_for_the_whole_job(sandbox):
    """Archives that each fit the budget fail together: across two sources, and an archive inside an archive (whose
    unpacked copy and its own contents both count)."""
    import os

    paths = []
    for i in range(2):
        path = sandbox.inputs / f"part{i}.zip"
        path.write_bytes(zip_bytes({f"noise{i}.png": os.urandom(5 * MiB)}))
        paths.append(str(path))
    for path in paths:  # each alone is within the budget (it is refused later, as no image, not by size)
        with pytest.raises(DataError) as alone:
            _prepare(sandbox, path, limits=fast_limits(max_total_bytes=8 * MiB))
        assert "left for the data" not in str(alone.value)
    _expect_error(sandbox, paths, DataError, "part1.zip: unpacks to 5.0 MiB, over the limit of 3.0 MiB left",
                  limits=fast_limits(max_total_bytes=8 * MiB))

    outer = sandbox.inputs / "outer.zip"
    outer.write_bytes(zip_bytes({"inner.zip": zip_bytes({"noise.png": os.urandom(3 * MiB)})}))
    _expect_error(sandbox, outer, DataError, "inner.zip (in ", "unpacks to 3.0 MiB, over the limit of 2.0 MiB left",
                  limits=fast_limits(max_total_bytes=5 * MiB))


def test_skips_are_summarised_per_archive(sandbox, caplog):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(300):
            archive.writestr(f"../escape{i}.png", b"x")
        archive.writestr("ok.png", png(1))
    path = sandbox.inputs / "noisy.zip"
    path.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        dataset = _prepare(sandbox, path)
    assert len(dataset) == 1
    lines = [r.getMessage() for r in caplog.records if "escape" in r.getMessage()]
    assert len(lines) == 20, len(lines)
    assert any("noisy.zip: 280 more members skipped (280 × unsafe path in archive)" in r.getMessage()
               for r in caplog.records)
    assert dataset.info["skipped"] == 300


def test_a_full_disk_while_unpacking_names_the_file(sandbox, monkeypatch):
    import errno

    from trainer.data.ingest import budget

    archive = sandbox.inputs / "photos.zip"
    archive.write_bytes(zip_bytes({"a.png": png(1)}))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(budget, "copy_capped", full)
    monkeypatch.setattr("trainer.data.ingest.archives.copy_capped", full)
    _expect_error(sandbox, archive, ValueError, "the disk is full: could not write", "a.png", "free space in")
