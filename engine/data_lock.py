"""One server per data folder: an exclusive `flock` on `DATA/engine.lock` for the server's lifetime.

Two servers appending to one log would interleave seqs and corrupt it, and a tool writing into a
live server's folder would do the same. The lock is advisory (`flock`): it guards our own
processes, which all take it. The kernel drops it when the holder exits, even by kill -9, so a
crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os

LOCK_FILE_NAME = "engine.lock"


class DataFolderLocked(Exception):
    """Another process (a running server, or a shell writing into it) holds the data folder."""


class DataFolderLock:
    """An exclusive lock on a data folder, held until `release`."""

    def __init__(self, data_dir: str, file_descriptor: int):
        self.data_dir = data_dir
        self._file_descriptor: int | None = file_descriptor

    def release(self) -> None:
        """Drop the lock (closing the file releases the `flock`)."""
        if self._file_descriptor is not None:
            os.close(self._file_descriptor)
            self._file_descriptor = None


def lock_data_folder(data_dir: str) -> DataFolderLock:
    """Take the data folder's lock without waiting (creating the folder if needed).

    Raises `DataFolderLocked` when another process holds it."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, LOCK_FILE_NAME)
    file_descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(file_descriptor)
        raise DataFolderLocked(
            f"the data folder {data_dir} is in use: another process (a running server?) holds {path}"
        ) from None
    except BaseException:
        os.close(file_descriptor)
        raise
    return DataFolderLock(data_dir, file_descriptor)


def data_folder_is_locked(data_dir: str) -> bool:
    """Whether a process holds the data folder's lock right now (a running server). Takes and
    drops the lock to find out; a folder without a lock file is not locked."""
    path = os.path.join(data_dir, LOCK_FILE_NAME)
    try:
        file_descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(file_descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(file_descriptor)
    return False
