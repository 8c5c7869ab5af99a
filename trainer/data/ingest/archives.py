"""Unpacking zip and tar archives from strangers: training data, and the LoRA zips the predictor is given.

Members are written by this module, one by one, to paths rebuilt from their cleaned names (never with
``extractall``): ``..``, absolute paths, links and device files are skipped with a warning naming them. Every limit
holds before the bytes are spent where the archive declares them, and again on what really comes out:

- one byte budget for the whole job, across members and nested archives (:class:`~trainer.data.ingest.budget.
  ByteBudget`), and a cap on the files created;
- the ratio of unpacked to packed size, per large member and for the archive as a whole (bombs made of many members
  that each look harmless);
- zip central directories whose entries overlap or point twice at the same data are refused, as are central
  directories and tar headers (GNU long names, pax records) too large to be honest, before they are read;
- duplicate names are renamed in linear time, and a file that clashes with a folder of the same name is skipped;
- skips are logged one by one only for the first members of an archive, then summarised.

Password-protected, truncated and corrupt archives are refused as a whole with a message naming the archive.
"""

from __future__ import annotations

import errno
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from trainer.data.errors import ArchiveError, DataError
from trainer.data.ingest.budget import ByteBudget, copy_capped
from trainer.data.ingest.safety import NameTable, UnsafePath, printable, resolve_inside, safe_relative_path
from trainer.data.ingest.sniff import ARCHIVE_KINDS, read_head, sniff
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport
from trainer.utils.atomic import is_disk_full, write_error
from trainer.utils.download import human_size

#: File names that are unpacked when found inside a source (a nested ``.docx`` is a zip too, but not ours).
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".gz", ".tbz2", ".tbz", ".tar.bz2", ".bz2", ".txz",
                    ".tar.xz", ".xz")
#: Largest zip central directory read (a 20,000-entry archive with long names needs a few MiB).
MAX_CENTRAL_DIRECTORY_BYTES = 32 << 20
#: Largest tar extension header (GNU long name or link, pax record) read into memory.
MAX_TAR_HEADER_BYTES = 256 << 10

_ZIP_ENCRYPTED = 0x1
_ZIP_UTF8 = 0x800
_LOCAL_HEADER_BYTES = 30


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
                              NotImplementedError, RuntimeError, struct.error))


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return printable(text[:160])


def unpack_untrusted(path: Path, dest: Path, label: str, limits: DataLimits,
                     report: PrepReport | None = None) -> PrepReport:
    """Unpack one zip or tar file (of any kind :func:`~trainer.data.ingest.sniff.sniff` knows) into the new folder
    ``dest`` under ``limits``, with a budget of its own; the report lists what was skipped."""
    report = report or PrepReport()
    kind = sniff(read_head(path))
    if kind not in ARCHIVE_KINDS:
        raise ArchiveError(f"{label}: not a zip or tar archive")
    extract_archive(path, kind, dest, label, ExtractContext(limits, ByteBudget(limits), report))
    return report


def extract_archive(path: Path, kind: str, dest: Path, label: str, ctx: ExtractContext) -> None:
    """Unpack ``path`` (of sniffed ``kind``: zip, tar, gzip, bz2 or xz) into the new (or empty) folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} must be empty to unpack {label} into it")
    names = NameTable()
    try:
        if kind == "zip":
            _extract_zip(path, dest, label, ctx, names)
        else:
            _extract_tar(path, kind, dest, label, ctx, names)
    finally:
        ctx.report.end_group(label)


def _prepare_target(dest: Path, relative: PurePosixPath, item: str, label: str, ctx: ExtractContext,
                    names: NameTable) -> Path | None:
    claimed = names.claim(relative)
    if claimed is None:
        ctx.report.skip(item, "it would go inside a file of the same name as its folder", group=label)
        return None
    try:
        target = resolve_inside(dest, claimed)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})", group=label)
    except (FileExistsError, NotADirectoryError):
        ctx.report.skip(item, "its folder clashes with a file of the same name", group=label)
    except OSError as error:
        if is_disk_full(error) or error.errno == errno.EROFS:
            raise write_error(error, dest / claimed) from None
        ctx.report.skip(item, f"cannot be written here ({error.strerror})", group=label)
    return None


def _write_member(source, target: Path, item: str, size: int, ctx: ExtractContext) -> None:
    ctx.budget.add_file(item)
    try:
        copy_capped(source, target, budget=ctx.budget, item=item, max_bytes=min(size, ctx.limits.max_download_bytes),
                    what="member")
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _too_many_entries(limits: DataLimits) -> str:
    """The entry-cap refusal, worded alike for zip and tar (the count of a streamed tar is "more than")."""
    return f"more than the limit of {limits.max_archive_entries} entries per archive; split it into smaller archives"


def _check_ratio(unpacked: int, packed: int, what: str, limits: DataLimits) -> None:
    if unpacked >= limits.ratio_check_min_bytes and unpacked / max(packed, 1) > limits.max_compression_ratio:
        raise ArchiveError(
            f"{what}: unpacks to {human_size(unpacked)} from {human_size(packed)}, over "
            f"{limits.max_compression_ratio:.0f} times its packed size (a zip bomb); the archive is refused"
        )


# --------------------------------------------------------------------------------------------------------- zip
def _zip_mode(info: zipfile.ZipInfo) -> int:
    # Unix permission bits live in the high half of external_attr; other systems leave them 0.
    return (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0


def _check_end_record(path: Path, label: str, limits: DataLimits) -> None:
    """Refuse a central directory too large to read, from the end record alone (before zipfile parses it)."""
    try:
        with open(path, "rb") as handle:
            record = zipfile._EndRecData(handle)  # the end-of-central-directory record, zip64 resolved
    except (OSError, struct.error):
        return  # zipfile reports the unreadable archive itself
    if not record:
        return
    entries, size = record[zipfile._ECD_ENTRIES_TOTAL], record[zipfile._ECD_SIZE]
    if entries > limits.max_archive_entries:
        raise ArchiveError(f"{label}: {entries} entries, {_too_many_entries(limits)}")
    if size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise ArchiveError(f"{label}: its central directory is {human_size(size)}, more than the limit of "
                           f"{human_size(MAX_CENTRAL_DIRECTORY_BYTES)} (member names far too long)")


def _raw_name_length(info: zipfile.ZipInfo) -> int:
    encoding = "utf-8" if info.flag_bits & _ZIP_UTF8 else "cp437"
    try:
        return len(info.orig_filename.encode(encoding))
    except UnicodeEncodeError:
        return len(info.orig_filename.encode("utf-8"))


def _check_zip_layout(infos: list[zipfile.ZipInfo], directory_start: int, label: str) -> None:
    """Each entry's data must lie between its local header and the next entry: overlapping entries (one stored
    member counted many times, the "overlapped zip bomb") are refused."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for index, info in enumerate(ordered):
        end = info.header_offset + _LOCAL_HEADER_BYTES + _raw_name_length(info) + info.compress_size
        limit = ordered[index + 1].header_offset if index + 1 < len(ordered) else directory_start
        if end > limit:
            same = index + 1 < len(ordered) and ordered[index + 1].header_offset == info.header_offset
            what = "point at the same data" if same else "overlap"
            raise ArchiveError(f"{label}: entries of its central directory {what} ({member_label(info.filename, label)}"
                               "); a zip built to multiply its contents is refused")


def _extract_zip(path: Path, dest: Path, label: str, ctx: ExtractContext, names: NameTable) -> None:
    limits = ctx.limits
    _check_end_record(path, label, limits)
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
            raise ArchiveError(f"{label}: {len(infos)} entries, {_too_many_entries(limits)}")
        if any(info.flag_bits & _ZIP_ENCRYPTED for info in infos):
            raise ArchiveError(
                f"{label}: the zip is password-protected; unzip it and upload the images without a password"
            )
        _check_zip_layout(infos, archive.start_dir, label)
        files = [info for info in infos if not info.is_dir()]
        declared = sum(info.file_size for info in files)
        if declared > ctx.budget.left:
            raise ArchiveError(
                f"{label}: unpacks to {human_size(declared)}, over the limit of {human_size(ctx.budget.left)} "
                "left for the data (a zip bomb, or far too many files)"
            )
        for info in files:  # a single bomb member is named; many small ones are caught as a whole below
            _check_ratio(info.file_size, info.compress_size, member_label(info.filename, label), limits)
        _check_ratio(declared, path.stat().st_size, label, limits)
        for info in files:
            _extract_zip_member(archive, info, dest, label, ctx, names)


def _extract_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, label: str,
                        ctx: ExtractContext, names: NameTable) -> None:
    item = member_label(info.filename, label)
    try:
        relative = safe_relative_path(info.filename)
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})", group=label)
        return
    mode = _zip_mode(info)
    if stat.S_ISLNK(mode):
        ctx.report.skip(item, "symbolic link in archive", group=label)
        return
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # no file-type bits at all is common (Python's zipfile)
        ctx.report.skip(item, "not a regular file", group=label)
        return
    target = _prepare_target(dest, relative, item, label, ctx, names)
    if target is None:
        return
    try:
        with archive.open(info) as source:
            _write_member(source, target, item, info.file_size, ctx)
    except DataError:
        raise
    except OSError as error:
        if not _decoder_error(error):
            raise write_error(error, target) from None
        ctx.report.skip(item, f"corrupt archive member ({_reason(error)})", group=label)
    except Exception as error:
        if not _decoder_error(error):
            raise
        ctx.report.skip(item, f"corrupt archive member ({_reason(error)})", group=label)


# --------------------------------------------------------------------------------------------------------- tar
class _HeaderTooLarge(tarfile.TarError):
    pass


class _CappedTarInfo(tarfile.TarInfo):
    """A tar header whose extension records (GNU long names and links, pax) are refused past a size, before tarfile
    reads them into memory."""

    _EXTENSIONS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tarfile_):
        if self.type in self._EXTENSIONS and self.size > MAX_TAR_HEADER_BYTES:
            raise _HeaderTooLarge(f"a {human_size(self.size)} header record")
        return super()._proc_member(tarfile_)


def _extract_tar(path: Path, kind: str, dest: Path, label: str, ctx: ExtractContext, names: NameTable) -> None:
    limits = ctx.limits
    packed = max(path.stat().st_size, 1)
    # Stream mode reads the archive once, front to back: a bomb is stopped while it inflates, not after.
    try:
        archive = tarfile.open(path, mode="r|*", tarinfo=_CappedTarInfo)  # noqa: SIM115 - closed by the `with` below
    except _HeaderTooLarge as error:
        raise ArchiveError(f"{label}: {error} (far longer than any file name): the archive is refused") from None
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
                    raise ArchiveError(f"{label}: {_too_many_entries(limits)}")
                # Every member's data passes through the decompressor, extracted or not, so all count.
                declared += max(member.size, 0)
                if declared > start_left:
                    raise ArchiveError(
                        f"{label}: unpacks to more than {human_size(declared)}, over the limit of "
                        f"{human_size(start_left)} left for the data (a tar bomb, or far too many files)"
                    )
                if declared >= limits.ratio_check_min_bytes and declared / packed > limits.max_compression_ratio:
                    # Worded as the zip's (_check_ratio): the same refusal whichever archive a bundle came in.
                    raise ArchiveError(
                        f"{label}: unpacks to {human_size(declared)} or more from {human_size(packed)}, over "
                        f"{limits.max_compression_ratio:.0f} times its packed size (a tar bomb); the archive is refused"
                    )
                _extract_tar_member(archive, member, dest, label, ctx, names)
        except DataError:
            raise
        except _HeaderTooLarge as error:
            raise ArchiveError(f"{label}: {error} (far longer than any file name): the archive is refused") from None
        except Exception as error:
            if not _decoder_error(error):
                raise
            raise ArchiveError(
                f"{label}: the archive is truncated or corrupt ({_reason(error)}); download or pack it again"
            ) from None


def _extract_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, label: str,
                        ctx: ExtractContext, names: NameTable) -> None:
    item = member_label(member.name, label)
    if member.issym() or member.islnk():
        ctx.report.skip(item, f"{'symbolic' if member.issym() else 'hard'} link in archive", group=label)
        return
    if member.isdir():
        return
    if not member.isfile() or member.issparse():
        ctx.report.skip(item, "not a regular file", group=label)
        return
    try:
        relative = safe_relative_path(member.name)
    except UnsafePath as error:
        ctx.report.skip(item, f"unsafe path in archive ({error})", group=label)
        return
    target = _prepare_target(dest, relative, item, label, ctx, names)
    if target is None:
        return
    source = archive.extractfile(member)
    if source is None:  # pragma: no cover - isfile() members always have data
        return
    try:
        _write_member(source, target, item, member.size, ctx)
    except OSError as error:
        if _decoder_error(error):
            raise
        raise write_error(error, target) from None

