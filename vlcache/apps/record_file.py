"""The captioner's JSONL output: one record per line, kept whole through crashes, full disks and other writers.

- One writer at a time: a run holds an exclusive lock on `<out>.lock` (a separate file, because the output itself
  is replaced when shards are merged). The kernel drops the lock when the process dies, kill -9 included, so a
  crashed run never leaves the file locked.
- A record is appended with one `write` on an O_APPEND descriptor and fsynced before the next video starts: a
  killed run leaves at most one torn last line, and a write that fails (full disk) is cut back off at once.
- Lines that are not whole records (a torn tail, or garbage) are set aside into `<out>.torn` when the file is
  merged, never silently dropped or glued to the next record; their videos count as not done.
- Merging writes a uniquely named temporary file, fsyncs it and renames it over the output (atomic on POSIX).
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path


class OutputBusyError(RuntimeError):
    """Another run holds the output's lock."""


def _is_record(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("path"), str) and obj.get("status") in ("ok", "error")


RECORD_START = '{"path": "'  # how every record line begins (json.dumps of a dict whose first key is "path")


def _torn_record(line: str) -> bool:
    """A line that is a cut record (what a crash or a full disk leaves), not some other file's content."""
    return line.startswith(RECORD_START) or RECORD_START.startswith(line)


def record_key(rec: dict) -> tuple[str, str]:
    """What makes two records the same job: the video (its resolved file: the same video typed from another folder,
    or through a link, is one job; records written before `file` existed fall back to the path as typed) and the
    whole configuration it was captioned with."""
    return rec.get("file", rec["path"]), json.dumps(rec.get("config"), sort_keys=True)


def identity(path) -> dict:
    """Which file a record is about, and which version of it: the resolved path, and the size and modification
    time it had when captioned (a video replaced at the same path is another video: captioned again, not skipped
    with the old one's caption). An unreadable path gets its absolute form and no version."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"file": os.path.abspath(p), "version": None}
    return {"file": str(p.resolve()), "version": [st.st_size, st.st_mtime_ns]}


def is_current(rec: dict, ident: dict) -> bool:
    """True if `rec` was made from exactly this version of the file (records without a version never are)."""
    return rec.get("file") == ident["file"] and ident["version"] is not None and rec.get("version") == ident["version"]


def read(path: Path) -> tuple[list[dict], list[str]]:
    """(the whole records of a file in order, the lines that are not whole records)."""
    if not path.exists():
        return [], []
    records, bad = [], []
    for raw in path.read_bytes().split(b"\n"):  # records never hold a raw newline (json.dumps escapes it)
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if _is_record(obj):
            records.append(obj)
        else:
            bad.append(line)
    return records, bad


def shards(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".shard*"))


@contextmanager
def locked(out: Path):
    """Hold the exclusive lock of `out` for the duration, or raise OutputBusyError at once."""
    import fcntl  # POSIX; the lock is what keeps two runs from losing each other's records

    lock_path = out.with_name(out.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(f"cannot write {out}: cannot create {lock_path.name} beside it ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"{out} is being written by another vlcache caption run (it holds {lock_path.name}); "
                "wait for it to finish or give another -o"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def merge(out: Path) -> list[dict]:
    """Fold `out` and its shards into `out`: one record per video and configuration (the last success, else the
    last error), in first-seen order. Lines that are not records go to `<out>.torn`. Call with the lock held."""
    for tmp in stale_temporaries(out):
        tmp.unlink(missing_ok=True)
    files = [out, *shards(out)]
    best: dict[tuple[str, str], dict] = {}
    torn: list[str] = []
    for f in files:
        records, bad = read(f)
        foreign = [line for line in bad if not _torn_record(line)]
        if foreign:
            raise ValueError(
                f"{f} is not a vlcache captions file (a line of it reads {foreign[0][:40]!r}); "
                "give another -o, nothing was changed"
            )
        torn += bad
        for rec in records:
            key = record_key(rec)
            prev = best.get(key)
            if prev is None or rec["status"] == "ok" or prev["status"] != "ok":
                best[key] = rec
    if torn:
        _set_aside(out, torn)
    if len(files) == 1 and not torn and _is_canonical(out, best):
        return list(best.values())  # nothing to rewrite
    _replace(out, "".join(json.dumps(r) + "\n" for r in best.values()).encode())
    for f in files[1:]:
        f.unlink()
    return list(best.values())


def _is_canonical(out: Path, best: dict) -> bool:
    """True if `out` already holds exactly these records, one per line, newline-terminated."""
    if not out.exists():
        return True
    data = out.read_bytes()
    return data == "".join(json.dumps(r) + "\n" for r in best.values()).encode()


def _set_aside(out: Path, lines: list[str]) -> None:
    torn = out.with_name(out.name + ".torn")
    with open(torn, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _replace(out: Path, data: bytes) -> None:
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


class Appender:
    """Appends records to one file, each durable before `write` returns; a failed write leaves the file as it
    was before it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.written = 0

    def write(self, rec: dict) -> None:
        data = (json.dumps(rec) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            _write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, size)  # no torn line left behind for the next run to trip on
            except OSError:
                pass  # merge sets a torn line aside anyway
            raise
        self.written += 1

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary files left by a merge that was killed (only ever removed with the lock held)."""
    return list(out.parent.glob(out.name + ".*.tmp"))
