"""A write-behind queue's records on local disk while the store is unreachable.

Each sidecar appends to files of its own, `<queue>.<pid>-<random>.jsonl` in the spool directory (0700),
created on the first spill with mode 0600 and held under an exclusive `flock` for the process's
life. Each append is one batch of JSON lines (`models.record_to_json`), written and fsynced
before it counts as spilled. Records are read back oldest first; how far they reached the store
is kept in `<file>.offset` (replaced atomically and fsynced after each batch the store took), so a
crash while replaying reads at most one batch again (the store keeps it once: records carry
uids). A file read to its end is deleted.

At start, a sidecar adopts the files of sidecars that are gone (their lock is free) and replays
them before its own. Past `max_bytes` per queue and process, a spill is refused: the writer
drops those records, counts and logs them. The files hold only what the store would: records are
redacted when they are built (models.py). File I/O here blocks: callers run it off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _File:
    path: Path
    fd: int  # open read-write, flock'ed
    offset: int  # bytes already written to the store
    size: int


class Spool(Generic[T]):
    def __init__(
        self,
        directory: Path,
        queue: str,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
        max_bytes: int,
    ) -> None:
        self.directory = directory
        self.queue = queue
        self._encode = encode
        self._decode = decode
        self.max_bytes = max_bytes
        self._files: list[_File] = []  # oldest first; the last may be this process's own
        self._own: _File | None = None
        self.unreadable = 0  # lines that could not be read back (a torn write before a crash)

    @property
    def pending(self) -> bool:
        return any(f.offset < f.size for f in self._files)

    @property
    def bytes(self) -> int:
        """Bytes on disk not yet in the store."""
        return sum(f.size - f.offset for f in self._files)

    def adopt(self) -> int:
        """Take over the spool files of this queue left by sidecars that are gone; return how many bytes they hold."""
        if not self.directory.is_dir():
            return 0
        found = 0
        for path in sorted(self.directory.glob(f"{self.queue}.*.jsonl"), key=_mtime):
            if self._own is not None and path == self._own.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live sidecar's
                continue
            if os.fstat(fd).st_nlink == 0:  # finished and deleted by its owner meanwhile
                os.close(fd)
                continue
            size, torn = _whole_lines(fd)
            self.unreadable += torn
            spool_file = _File(path, fd, _read_offset(path), size)
            self._files.append(spool_file)
            found += max(0, size - spool_file.offset)
        if found:
            log.warning("spooled records found from an earlier run; replaying them",
                        extra={"queue": self.queue, "bytes": found})
        return found

    def append(self, records: Sequence[T]) -> int:
        """Write `records` (fsynced) and return how many were kept: all, or none past the bound."""
        if not records:
            return 0
        data = b"".join(json.dumps(self._encode(r), separators=(",", ":")).encode() + b"\n" for r in records)
        own = self._own or self._create()
        if own.size - own.offset + len(data) > self.max_bytes:
            return 0
        os.lseek(own.fd, own.size, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(own.fd, view):]
        os.fsync(own.fd)
        own.size += len(data)
        return len(records)

    def read(self, limit: int) -> tuple[list[T], list[int]]:
        """Up to `limit` records from the oldest file not yet written, with each one's end offset
        (give the last one written to `consumed`). Lines that cannot be read are skipped and counted."""
        for spool_file in self._files:
            if spool_file.offset >= spool_file.size:
                continue
            os.lseek(spool_file.fd, spool_file.offset, os.SEEK_SET)
            data = os.read(spool_file.fd, min(spool_file.size - spool_file.offset, 4 << 20))
            records: list[T] = []
            ends: list[int] = []
            at = spool_file.offset
            start = 0
            while len(records) < limit:
                end = data.find(b"\n", start)
                if end < 0:
                    if not records and start == 0:  # one line longer than the read: cannot be ours
                        self.unreadable += 1
                        self._consume(spool_file, spool_file.size)
                    break
                line = data[start:end]
                start = end + 1
                try:
                    records.append(self._decode(json.loads(line)))
                    ends.append(at + start)
                except (ValueError, TypeError, KeyError):
                    if records:  # keep the offsets simple: return what precedes the bad line
                        break
                    self.unreadable += 1
                    self._consume(spool_file, at + start)  # skip it at once
                    return self.read(limit)
            return records, ends
        return [], []

    def consumed(self, end: int) -> None:
        """The store took the records read up to byte `end` of the oldest pending file."""
        for spool_file in self._files:
            if spool_file.offset < spool_file.size:
                self._consume(spool_file, end)
                return

    def close(self) -> None:
        for spool_file in self._files:
            with contextlib.suppress(OSError):
                os.close(spool_file.fd)
        self._files = []
        self._own = None

    def _consume(self, spool_file: _File, end: int) -> None:
        spool_file.offset = end
        if end >= spool_file.size:  # all of it is in the store: delete it (data first, then its offset)
            with contextlib.suppress(FileNotFoundError):
                spool_file.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                _offset_path(spool_file.path).unlink()
            os.close(spool_file.fd)
            self._files.remove(spool_file)
            if spool_file is self._own:
                self._own = None
            return
        _write_offset(spool_file.path, end)

    def _create(self) -> _File:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{self.queue}.{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self._own = _File(path, fd, 0, 0)
        self._files.append(self._own)
        _fsync_dir(self.directory)
        return self._own


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _offset_path(path: Path) -> Path:
    return path.with_name(path.name + ".offset")


def _read_offset(path: Path) -> int:
    try:
        return int(_offset_path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_offset(path: Path, offset: int) -> None:
    target = _offset_path(path)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(offset).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def _whole_lines(fd: int) -> tuple[int, int]:
    """The file's size without a torn last line (a crash mid-append), which is cut off; and 1 if
    there was one, else 0."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, 0
    tail = min(size, 1 << 20)
    os.lseek(fd, size - tail, os.SEEK_SET)
    data = os.read(fd, tail)
    if data.endswith(b"\n"):
        return size, 0
    cut = data.rfind(b"\n")
    whole = size - tail + cut + 1 if cut >= 0 else (0 if tail == size else size)
    if whole != size:
        os.ftruncate(fd, whole)
        log.warning("a torn record at the end of a spool file was cut off", extra={"bytes": size - whole})
    return whole, int(whole != size)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
