"""Project archives uploaded through the app: checked for traversal, links, size and damage, then
extracted into the app's own private folder.

- Where: ``$PROPONENT_STATE_DIR/uploads`` (default ``~/.local/state/proponent/uploads``), created
  with mode 0700, never a shared, predictable folder under /tmp.
- Versions: each archive goes to ``upload-<sha256 of its bytes>``. Uploading the same archive
  again opens the folder already there, with its flags and runs; a different archive is a new
  folder. Nothing is ever wiped.
- Limits: the bytes actually decompressed are counted (a zip bomb that lies about its sizes is
  stopped), and a bad CRC or a truncated archive is the same one-line refusal.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from app.services.state import app_state_dir
from engine.core.errors import ProponentError

MAX_UPLOAD_BYTES = 200 * 2**20          # uncompressed size limit of an uploaded project archive
MAX_UPLOAD_FILES = 200_000
_CHUNK = 1 << 20


def uploads_root() -> Path:
    """The app's private upload folder (0700)."""
    root = app_state_dir() / "uploads"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    return root


def _damaged(e: BaseException) -> ProponentError:
    return ProponentError(f"the archive is damaged or truncated ({type(e).__name__}: {e}); nothing was extracted")


def _check_entries(infos: list[zipfile.ZipInfo], max_bytes: int, max_files: int) -> None:
    if len(infos) > max_files:
        raise ProponentError(f"archive has {len(infos)} entries; the limit is {max_files}")
    total = 0
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise ProponentError(f"archive entry {name!r} points outside the project folder (path traversal)")
        if (info.external_attr >> 16) & 0o170000 == stat.S_IFLNK:
            raise ProponentError(f"archive entry {name!r} is a symbolic link; links are not accepted")
        total += info.file_size
        if total > max_bytes:
            raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is "
                                 f"{max_bytes // 2**20} MiB")


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], into: Path, max_bytes: int) -> None:
    written = 0
    base = into.resolve()
    for info in infos:
        target = (into / info.filename).resolve()
        if target != base and base not in target.parents:
            raise ProponentError(f"archive entry {info.filename!r} points outside the project folder (path traversal)")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:  # the headers may lie about sizes; the bytes do not
                    raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is "
                                         f"{max_bytes // 2**20} MiB")
                out.write(chunk)


def extract_upload(data: bytes, dest_root: str | Path | None = None, *, max_bytes: int = MAX_UPLOAD_BYTES,
                   max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack an uploaded project zip into its own version folder under ``dest_root`` (default:
    :func:`uploads_root`) and return the folder holding project.toml. The same archive again
    returns the folder already there, untouched."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except zipfile.BadZipFile:
        raise ProponentError("the upload is not a zip archive") from None
    except (zlib.error, EOFError, OSError, ValueError) as e:
        raise _damaged(e) from None
    _check_entries(infos, max_bytes, max_files)
    tomls = sorted((PurePosixPath(i.filename) for i in infos if PurePosixPath(i.filename).name == "project.toml"),
                   key=lambda p: len(p.parts))
    if not tomls:
        raise ProponentError("archive has no project.toml")
    root = Path(dest_root) if dest_root is not None else uploads_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = root / f"upload-{hashlib.sha256(data).hexdigest()[:16]}"
    if (dest / tomls[0] / "..").resolve().is_dir() and (dest / tomls[0]).is_file():
        return dest / tomls[0].parent  # already extracted: keep its state (flags, runs) as it is
    tmp = root / f".{dest.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from a killed upload of this archive
    tmp.mkdir(mode=0o700)
    try:
        _extract(zf, infos, tmp, max_bytes)
        os.replace(tmp, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _damaged(e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / tomls[0].parent
