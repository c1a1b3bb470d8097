"""Files written whole: a temporary file in the same directory, then a rename, so a reader (or a
crash) never sees half of one; and JSON-lines logs read back after a crash may have cut their last line."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from r3.errors import R3Error


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def naming_os_errors(path: Path):
    """An OS error inside names ``path`` (one from a write to an open file names no file, so a
    full disk would be reported without saying where)."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def fsync_directory(path) -> None:
    """Flush a directory's entries (a rename into it, a file made in it) to the disk. Some file
    systems cannot sync a directory; there it is what they give."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What a file system that cannot sync answers (some FUSE and network mounts): nothing to flush there
_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def fsync_fd(fd: int) -> None:
    """``os.fsync``; a failed flush (a full disk, EIO) raises, a file system that cannot sync is
    left as it is."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC:
            raise


def fsync_file(path) -> None:
    """Flush a file's data to the disk (one written through another handle, or by another
    process); an error names the file."""
    with naming_os_errors(Path(path)):
        fd = os.open(path, os.O_RDONLY)
        try:
            fsync_fd(fd)
        finally:
            os.close(fd)


def fsync_tree(root) -> None:
    """Flush every file under ``root``, and its directories, to the disk. Call it before a rename
    publishes ``root``: a file system may commit the rename before the data, so that after a power
    cut the published name holds empty files (and the older copy deleted after it is gone)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fsync_file(os.path.join(dirpath, name))
        fsync_directory(dirpath)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with naming_os_errors(path):
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would not
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                fsync_fd(f.fileno())  # (before the rename: see fsync_tree)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json_lines(path: Path, bad_line: Callable[[int, json.JSONDecodeError], Exception]) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON-lines log. A last line that is not
    JSON is what a run killed mid-write leaves: it is skipped with a warning; any other such line
    raises ``bad_line(line number, error)``."""
    lines = Path(path).read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if n != last:
                raise bad_line(n, e) from None
            print(f"warning: {path}: skipping the last line, cut short by an interrupted write", file=sys.stderr)
    return rows


def check_out_path(out: str, what: str = "--out") -> Path:
    """``out`` as a Path when a file can be written there (not a directory; its nearest existing
    parent writable), else an R3Error naming ``what``: checked before a command's work, not after."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise R3Error(f"{what} {out}: is a directory, expected a file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise R3Error(f"{what} {out}: {parent} is not a directory")
    existing = next(p for p in (parent.absolute(), *parent.absolute().parents) if p.exists())
    try:  # a file can be made there (what os.access misses: a read-only file system, root)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".r3-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise R3Error(f"{what} {out}: cannot write in {existing} ({e.strerror or type(e).__name__})") from None
    return path


_HELD_LOCKS: dict = {}  # (device, inode) -> open file: the OS lets go of the locks when the process ends


def try_flock(f, *, shared: bool = False, quiet: bool = False) -> bool:
    """``flock`` without waiting: False when another open file holds it (EWOULDBLOCK; EACCES,
    as some network mounts answer). A file system that cannot lock (Lustre mounted ``noflock``,
    some FUSE and network mounts: ENOSYS, EOPNOTSUPP, ENOLCK) counts as locked, with a warning
    once per file system unless ``quiet`` (a probe that only reads), since refusing would stop
    every run there while nothing holds the file. Any other error reads as held."""
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in _CANNOT_LOCK:
            return False
        device = os.fstat(f.fileno()).st_dev
        if not quiet and device not in _UNLOCKABLE:
            _UNLOCKABLE.add(device)
            print(f"warning: {f.name}: this file system cannot lock files ({e.strerror or e}); nothing stops "
                  "two commands writing the same output there at once", file=sys.stderr, flush=True)
        return True


_CANNOT_LOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
_UNLOCKABLE: set = set()  # (devices whose file systems cannot lock: warned once)


def hold_lock(path: Path) -> tuple | None:
    """An exclusive hold on ``path`` (made if missing) for this process, until
    :func:`release_lock`: its (device, inode), or None when another process holds it. One a
    process holds already is its again (the same key)."""
    f = open(path, "a")
    st = os.fstat(f.fileno())
    key = (st.st_dev, st.st_ino)
    if key in _HELD_LOCKS:
        f.close()
        return key
    try:
        held = try_flock(f) and key[1] == os.stat(path).st_ino  # (not a file replaced or removed meanwhile)
    except OSError:  # (removed meanwhile)
        held = False
    if not held:
        f.close()
        return None
    _HELD_LOCKS[key] = f
    return key


def release_lock(key: tuple) -> None:
    f = _HELD_LOCKS.pop(key, None)
    if f is not None:
        f.close()
