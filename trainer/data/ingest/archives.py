"""Unpacking zip and tar archives from strangers.

Members are written by this module, one by one, to paths rebuilt from their cleaned names (never with
``extractall``): ``..``, absolute paths, links and device files are skipped with a warning naming them. Bombs are
refused before unpacking from the declared sizes, and while unpacking from the bytes that really come out.
Password-protected, truncated and corrupt archives are refused as a whole with a message naming the archive.
"""

from __future__ import annotations

import errno
import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from trainer.data.errors import ArchiveError, DataError
from trainer.data.ingest.budget import ByteBudget, copy_capped
from trainer.data.ingest.safety import UnsafePath, printable, resolve_inside, safe_relative_path, unique_path
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport
from trainer.utils.download import human_size

#: File names that are unpacked when found inside a source (a nested ``.docx`` is a zip too, but not ours).
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".gz", ".tbz2", ".tbz", ".tar.bz2", ".bz2", ".txz",
                    ".tar.xz", ".xz")

_ZIP_ENCRYPTED = 0x1


@dataclass
class ExtractContext:
    limits: DataLimits
    budget: ByteBudget
    report: PrepReport


def has_archive_suffix(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def member_label(name: str, archive_label: str) -> str:
    return f"{printable(name)} (in {archive_label})"


def _decoder_error(error: BaseException) -> bool:
    """True for errors of a corrupt stream, false for those of the file system (disk full must not look corrupt)."""
    if isinstance(error, OSError) and not isinstance(error, EOFError):
        return error.errno is None
    return isinstance(error, (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError,
                              NotImplementedError, RuntimeError))


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text[:160]


def extract_archive(path: Path, kind: str, dest: Path, label: str, ctx: ExtractContext) -> None:
    """Unpack ``path`` (of sniffed ``kind``) into the new folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=False)
    if kind == "zip":
        _extract_zip(path, dest, label, ctx)
    else:
        _extract_tar(path, kind, dest, label, ctx)


# --------------------------------------------------------------------------------------------------------- zip
def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Unix permission bits live in the high half of external_attr; other systems leave them 0.
    return (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0


def _extract_zip(path: Path, dest: Path, label: str, ctx: ExtractContext) -> None:
    limits = ctx.limits
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except Exception as error:
        raise ArchiveError(
            f"{label}: not a readable zip archive ({_reason(error)}); it may be truncated or corrupt: "
            "download or zip it again"
        ) from None
    with archive:
        if len(infos) > limits.max_archive_entries:
            raise ArchiveError(
                f"{label}: {len(infos)} entries, more than the limit of {limits.max_archive_entries}; "
                "split the images into smaller archives"
            )
        if any(info.flag_bits & _ZIP_ENCRYPTED for info in infos):
            raise ArchiveError(
                f"{label}: the zip is password-protected; unzip it and upload the images without a password"
            )
        files = [info for info in infos if not info.is_dir()]
        declared = sum(info.file_size for info in files)
        if declared > ctx.budget.left:
            raise ArchiveError(
                f"{label}: unpacks to {human_size(declared)}, over the limit of {human_size(ctx.budget.left)} "
                "left for the training data (a zip bomb, or far too many images)"
            )
        for info in files:
            _extract_zip_member(archive, info, dest, label, ctx)


def _extract_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, label: str,
                        ctx: ExtractContext) -> None:
    limits = ctx.limits
    item = member_label(info.filename, label)
    try:
        relative = safe_relative_path(info.filename)
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})")
        return
    mode = _zip_mode(info)
    if stat.S_ISLNK(mode):
        ctx.report.skip(item, "symbolic link in archive")
        return
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # no file-type bits at all is common (Python's zipfile)
        ctx.report.skip(item, "not a regular file")
        return
    if info.file_size >= limits.ratio_check_min_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_compression_ratio:
            raise ArchiveError(
                f"{item}: compressed {ratio:.0f}:1 to {human_size(info.file_size)}, over the ratio limit of "
                f"{limits.max_compression_ratio:.0f}:1 (a zip bomb); the archive is refused"
            )
    target = _prepare_target(dest, relative, item, ctx)
    if target is None:
        return
    try:
        with archive.open(info) as source:
            copy_capped(source, target, budget=ctx.budget, item=item,
                        max_bytes=min(info.file_size, limits.max_download_bytes), what="member")
    except DataError:
        target.unlink(missing_ok=True)
        raise
    except Exception as error:
        target.unlink(missing_ok=True)
        if not _decoder_error(error):
            raise
        ctx.report.skip(item, f"corrupt archive member ({_reason(error)})")


def _prepare_target(dest: Path, relative, item: str, ctx: ExtractContext) -> Path | None:
    try:
        target = resolve_inside(dest, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        return unique_path(target)
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})")
    except (FileExistsError, NotADirectoryError):
        ctx.report.skip(item, "its folder clashes with a file of the same name")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        ctx.report.skip(item, f"cannot be written here ({error.strerror})")
    return None


# --------------------------------------------------------------------------------------------------------- tar
def _extract_tar(path: Path, kind: str, dest: Path, label: str, ctx: ExtractContext) -> None:
    limits = ctx.limits
    packed = max(path.stat().st_size, 1)
    # Stream mode reads the archive once, front to back: a bomb is stopped while it inflates, not after.
    try:
        archive = tarfile.open(path, mode="r|*")  # noqa: SIM115 - closed by the `with` below, once opening worked
    except Exception as error:
        if kind in ("gzip", "bz2", "xz"):
            raise ArchiveError(
                f"{label}: a {kind} file that is not a readable tar archive ({_reason(error)}); only compressed "
                "tar archives (.tar.gz, .tgz, .tar.bz2, .tar.xz) are unpacked"
            ) from None
        raise ArchiveError(f"{label}: not a readable tar archive ({_reason(error)})") from None
    declared = 0
    entries = 0
    start_left = ctx.budget.left
    with archive:
        try:
            for member in archive:
                entries += 1
                if entries > limits.max_archive_entries:
                    raise ArchiveError(
                        f"{label}: more than the limit of {limits.max_archive_entries} entries; split the images "
                        "into smaller archives"
                    )
                # Every member's data passes through the decompressor, extracted or not, so all count.
                declared += max(member.size, 0)
                if declared > start_left:
                    raise ArchiveError(
                        f"{label}: unpacks to more than the {human_size(start_left)} left for the training data "
                        "(a tar bomb, or far too many images)"
                    )
                if declared >= limits.ratio_check_min_bytes and declared / packed > limits.max_compression_ratio:
                    raise ArchiveError(
                        f"{label}: unpacks to over {limits.max_compression_ratio:.0f} times its packed size "
                        f"({human_size(declared)} from {human_size(packed)}), a tar bomb; the archive is refused"
                    )
                _extract_tar_member(archive, member, dest, label, ctx)
        except DataError:
            raise
        except Exception as error:
            if not _decoder_error(error):
                raise
            raise ArchiveError(
                f"{label}: the archive is truncated or corrupt ({_reason(error)}); download or pack it again"
            ) from None


def _extract_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, label: str,
                        ctx: ExtractContext) -> None:
    item = member_label(member.name, label)
    if member.issym() or member.islnk():
        ctx.report.skip(item, f"{'symbolic' if member.issym() else 'hard'} link in archive")
        return
    if member.isdir():
        return
    if not member.isfile() or member.issparse():
        ctx.report.skip(item, "not a regular file")
        return
    try:
        relative = safe_relative_path(member.name)
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})")
        return
    target = _prepare_target(dest, relative, item, ctx)
    if target is None:
        return
    source = archive.extractfile(member)
    if source is None:  # pragma: no cover - isfile() members always have data
        return
    try:
        copy_capped(source, target, budget=ctx.budget, item=item,
                    max_bytes=min(member.size, ctx.limits.max_download_bytes), what="member")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
