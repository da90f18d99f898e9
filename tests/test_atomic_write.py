"""fedtune.atomic_write: the whole new file or the old one, and no temporary file left behind."""

from __future__ import annotations

import threading

import pytest

from fedtune.atomic_write import write_atomic


def test_writers_in_threads_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "index.json"
    errors = []

    def write(i: int) -> None:
        try:
            for _ in range(50):
                write_atomic(path, f"{i}\n".encode() * 100)
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(path.read_bytes().splitlines())) == 1  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"old", durable=True)
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
