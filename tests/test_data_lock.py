"""One server per data folder: the second one is refused with a clear error, in-process and from
the command line; the lock goes with the server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.data_lock import DataFolderLocked, data_folder_is_locked, lock_data_folder
from engine.server import run_server

import conftest


async def test_a_second_server_on_the_same_folder_is_refused(start_server, data_dir):
    server = await start_server()
    assert data_folder_is_locked(str(data_dir))
    with pytest.raises(DataFolderLocked, match="in use"):
        await run_server(conftest.test_config(data_dir))
    await server.aclose()
    assert not data_folder_is_locked(str(data_dir))
    again = await start_server()  # the lock went with the first server
    await again.aclose()


def test_serve_on_a_folder_in_use_exits_with_a_clear_error(tmp_path):
    data_dir = tmp_path / "data"
    held = lock_data_folder(str(data_dir))
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--port", "0", "--data", str(data_dir), "--map-size-mb", "64"],
            cwd=conftest.ROOT, capture_output=True, text=True, timeout=30,
        )
    finally:
        held.release()
    assert finished.returncode == 1
    assert "is in use" in finished.stderr and "Traceback" not in finished.stderr


def test_the_lock_is_exclusive_and_released(tmp_path):
    first = lock_data_folder(str(tmp_path))
    with pytest.raises(DataFolderLocked):
        lock_data_folder(str(tmp_path))
    first.release()
    first.release()  # idempotent
    lock_data_folder(str(tmp_path)).release()
