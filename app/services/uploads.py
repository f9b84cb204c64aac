"""Project archives uploaded through the app: checked for traversal, links, size and damage, then
extracted into the app's own private folder.

- Where: ``$PROPONENT_STATE_DIR/uploads`` (default ``~/.local/state/proponent/uploads``), created
  with mode 0700, never a shared, predictable folder under /tmp.
- Versions: each archive goes to ``upload-<sha256 of its bytes>``. Uploading the same archive
  again opens the folder already there, with its flags and runs; a different archive is a new
  folder. Nothing is ever wiped.
- Limits: the bytes actually decompressed are counted (a zip bomb that lies about its sizes is
  stopped), and a bad CRC or a truncated archive is the same one-line refusal.
- Every entry is checked before anything is written (encryption, compression method, empty or
  over-long names, a name that is both a file and a folder, duplicates), so a refusal is one
  line naming the entry and leaves no folder behind. macOS metadata (``__MACOSX/``, ``._*``
  AppleDouble files, ``.DS_Store``) is skipped: it is not part of the project and an AppleDouble
  ``._x.png`` would otherwise be read as a broken image.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import lzma
import os
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from app.services.state import app_state_dir
from engine.core.errors import ProponentError

MAX_UPLOAD_BYTES = 200 * 2**20          # uncompressed size limit of an uploaded project archive
MAX_UPLOAD_FILES = 200_000
MAX_NAME_BYTES = 255                    # one path component: NAME_MAX of ext4, xfs, btrfs, tmpfs
MAX_PATH_BYTES = 1024                   # a whole entry path, well inside PATH_MAX with the upload folder before it
MAX_DEPTH = 64                          # folder levels of one entry
STALE_PARTIAL_SECONDS = 6 * 3600        # a temporary folder this old belongs to an upload that was killed
_CHUNK = 1 << 20

# compression methods this Python can unpack (bzip2 / lzma only when their modules were built)
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED} | {
    method for method, module in ((zipfile.ZIP_BZIP2, "bz2"), (zipfile.ZIP_LZMA, "lzma"))
    if importlib.util.find_spec(module) is not None}
_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard", 95: "XZ",
                 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}
_NOTHING = "nothing was extracted"


def uploads_root() -> Path:
    """The app's private upload folder (0700)."""
    root = app_state_dir() / "uploads"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    return root


def _damaged(e: BaseException, name: str | None = None) -> ProponentError:
    where = f" at entry {name!r}" if name is not None else ""
    return ProponentError(f"the archive is damaged or truncated{where} ({type(e).__name__}: {e}); {_NOTHING}")


def _parts(name: str) -> tuple[str, ...]:
    """The entry's path components as they will be written: backslashes are separators (archives
    made on Windows), and empty and '.' components collapse, exactly as the checks see them."""
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _is_dir(name: str) -> bool:
    return name.endswith(("/", "\\"))  # ZipInfo.is_dir() raises IndexError on an empty name


def _mac_metadata(parts: tuple[str, ...]) -> bool:
    return bool(parts) and (parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store")


def _refuse(name: str, problem: str) -> ProponentError:
    shown = name if len(name) <= 80 else name[:80] + "…"  # a 3,000-level name must still be one readable line
    return ProponentError(f"archive entry {shown!r} {problem}; {_NOTHING}")


def _check_entries(infos: list[zipfile.ZipInfo], max_bytes: int, max_files: int) -> list[tuple[zipfile.ZipInfo, tuple]]:
    """Every entry checked before anything is written; returns (entry, path components) of what
    to extract (macOS metadata and the root folder's own entry left out)."""
    if len(infos) > max_files:
        raise ProponentError(f"archive has {len(infos)} entries; the limit is {max_files}")
    total = 0
    keep: list[tuple[zipfile.ZipInfo, tuple]] = []
    files: dict[tuple, str] = {}
    folders: dict[tuple, str] = {}  # every folder an entry needs → the entry that needs it
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise ProponentError(f"archive entry {name!r} points outside the project folder (path traversal)")
        if (info.external_attr >> 16) & 0o170000 == stat.S_IFLNK:
            raise ProponentError(f"archive entry {name!r} is a symbolic link; links are not accepted")
        parts, is_dir = _parts(name), _is_dir(name)
        if _mac_metadata(parts):
            continue
        if not parts:
            if is_dir:
                continue  # "./": the project folder itself
            raise _refuse(name, "has no name (empty or '.')")
        if len(parts) > MAX_DEPTH:
            raise _refuse(name, f"is {len(parts)} folders deep; the limit is {MAX_DEPTH}")
        long = next((c for c in parts if len(os.fsencode(c)) > MAX_NAME_BYTES), None)
        if long is not None:
            raise _refuse(name, f"has a name part of {len(os.fsencode(long))} bytes; the limit is "
                                f"{MAX_NAME_BYTES}")
        if len(os.fsencode("/".join(parts))) > MAX_PATH_BYTES:
            raise _refuse(name, f"has a path longer than {MAX_PATH_BYTES} bytes")
        for k in range(1, len(parts)):
            folders.setdefault(parts[:k], name)
        if is_dir:
            folders.setdefault(parts, name)
        else:
            if info.flag_bits & 0x1:
                raise _refuse(name, "is encrypted; upload an archive made without a password")
            if info.compress_type not in _SUPPORTED_METHODS:
                method = _METHOD_NAMES.get(info.compress_type, "unknown")
                raise _refuse(name, f"uses compression method {info.compress_type} ({method}), which cannot be "
                                    f"unpacked here; make the archive with ordinary (deflate) compression")
            if parts in files:
                # the second copy would overwrite the first: which one is the project's is unknowable
                raise _refuse(name, "appears twice in the archive")
            files[parts] = name
            total += info.file_size
            if total > max_bytes:
                raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is "
                                     f"{max_bytes // 2**20} MiB")
        keep.append((info, parts))
    for parts, name in files.items():
        if parts in folders:
            raise _refuse(name, f"is a file, but entry {folders[parts]!r} uses it as a folder")
    return keep


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """The entry's decompressed bytes; any reading or decompression failure is one line naming it
    (bz2 reports bad data as OSError, lzma as LZMAError)."""
    try:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError, NotImplementedError,
            ValueError) as e:
        raise _damaged(e, info.filename) from None


def _extract(zf: zipfile.ZipFile, entries: list[tuple[zipfile.ZipInfo, tuple]], into: Path, max_bytes: int) -> None:
    written = 0
    base = into.resolve()
    for info, parts in entries:
        target = into.joinpath(*parts)
        if base not in target.resolve().parents:
            raise ProponentError(f"archive entry {info.filename!r} points outside the project folder (path traversal)")
        try:
            if _is_dir(info.filename):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:  # "x": never write over another entry
                for chunk in _chunks(zf, info):
                    written += len(chunk)
                    if written > max_bytes:  # the headers may lie about sizes; the bytes do not
                        raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is "
                                             f"{max_bytes // 2**20} MiB")
                    out.write(chunk)
        except OSError as e:  # writing: a full disk, a quota, a name the file system refuses
            raise _refuse(info.filename, f"cannot be written ({e.strerror or e})") from None


def _sweep_stale_partials(root: Path) -> None:
    """Temporary folders left by uploads that were killed mid-way (each upload removes its own
    otherwise); only ones old enough that no upload can still be writing them."""
    cutoff = time.time() - STALE_PARTIAL_SECONDS
    for old in root.glob(".upload-*.partial"):
        try:
            if old.is_dir() and not old.is_symlink() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def extract_upload(data: bytes, dest_root: str | Path | None = None, *, max_bytes: int = MAX_UPLOAD_BYTES,
                   max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack an uploaded project zip into its own version folder under ``dest_root`` (default:
    :func:`uploads_root`) and return the folder holding project.toml. The same archive again
    returns the folder already there, untouched (also when two sessions upload it at once)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except zipfile.BadZipFile:
        raise ProponentError("the upload is not a zip archive") from None
    except (zlib.error, EOFError, OSError, ValueError) as e:
        raise _damaged(e) from None
    entries = _check_entries(infos, max_bytes, max_files)
    tomls = sorted((parts for info, parts in entries if parts[-1] == "project.toml" and not _is_dir(info.filename)),
                   key=len)
    if not tomls:
        raise ProponentError("archive has no project.toml")
    project = tomls[0][:-1]
    root = Path(dest_root) if dest_root is not None else uploads_root()
    dest = root / f"upload-{hashlib.sha256(data).hexdigest()[:16]}"
    if dest.joinpath(*tomls[0]).is_file():
        return dest.joinpath(*project)  # already extracted: keep its state (flags, runs) as it is
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _sweep_stale_partials(root)
        # a folder of its own per call (0700): two sessions uploading the same archive at once must
        # not share, and so wipe, each other's half-written folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=root))
    except OSError as e:
        raise ProponentError(f"cannot write to the upload folder {root} ({e.strerror or e}); {_NOTHING}") from None
    try:
        _extract(zf, entries, tmp, max_bytes)
        try:
            os.replace(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.joinpath(*tomls[0]).is_file():
                raise ProponentError(f"cannot move the unpacked archive into {dest} ({e.strerror or e}); "
                                     f"{_NOTHING}") from None
            shutil.rmtree(tmp, ignore_errors=True)  # another upload of the same archive finished first: use it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest.joinpath(*project)
