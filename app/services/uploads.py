"""Project archives uploaded through the app: checked for traversal, links and size before extraction."""
from __future__ import annotations

import base64
import io
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from engine.core.errors import ProponentError
from engine.storage.arrays import stable_hash

MAX_UPLOAD_BYTES = 200 * 2**20          # uncompressed size limit of an uploaded project archive


MAX_UPLOAD_FILES = 200_000


def extract_upload(data: bytes, dest_root: str | Path, *, max_bytes: int = MAX_UPLOAD_BYTES,
                   max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Unpack an uploaded project zip into a fresh folder under ``dest_root``; return the folder
    holding project.toml. Rejects path traversal, absolute paths, links, oversize archives."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ProponentError("the upload is not a zip archive") from None
    infos = zf.infolist()
    if len(infos) > max_files:
        raise ProponentError(f"archive has {len(infos)} entries; the limit is {max_files}")
    total = 0
    for info in infos:
        name = info.filename
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
            raise ProponentError(f"archive entry {name!r} points outside the project folder (path traversal)")
        mode = (info.external_attr >> 16) & 0o170000
        if mode == stat.S_IFLNK:
            raise ProponentError(f"archive entry {name!r} is a symbolic link; links are not accepted")
        total += info.file_size
        if total > max_bytes:
            raise ProponentError(f"archive unpacks to more than {max_bytes // 2**20} MiB; the limit is {max_bytes // 2**20} MiB")
    tomls = sorted((PurePosixPath(i.filename) for i in infos if PurePosixPath(i.filename).name == "project.toml"),
                   key=lambda p: len(p.parts))
    if not tomls:
        raise ProponentError("archive has no project.toml")
    dest = Path(dest_root) / f"upload-{stable_hash(base64.b64encode(data[:1 << 20]).decode() + str(len(data)), 12)}"
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for info in infos:
            target = (tmp / info.filename).resolve()
            if not str(target).startswith(str(tmp.resolve()) + os.sep) and target != tmp.resolve():
                raise ProponentError(f"archive entry {info.filename!r} points outside the project folder (path traversal)")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest / tomls[0].parent
