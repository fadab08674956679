"""bundle/atomic.py: `replaced` leaves the old content or the new one, never a torn file."""
from __future__ import annotations

import pytest

from bundle.atomic import replaced, write_text_atomic


def test_replaced_renames_on_success_and_keeps_the_old_file_on_an_error(tmp_path):
    path = tmp_path / "state.json"
    write_text_atomic(path, "old")
    (tmp_path / "state.json.tmp").write_text("leftover of a killed writer")
    with pytest.raises(RuntimeError):
        with replaced(path) as tmp:
            assert not tmp.exists()  # the leftover is gone before the writer starts
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and not (tmp_path / "state.json.tmp").exists()
    with replaced(path, suffix=".tmp.npz", fsync=True) as tmp:
        assert tmp.name == "state.json.tmp.npz"
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible before the rename
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_replaced_writes_a_directory_under_its_fixed_temporary_name(tmp_path):
    final = tmp_path / "step-00000004"
    with replaced(final, fsync=True) as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"x")
    assert (final / "a.bin").read_bytes() == b"x" and not tmp.exists()
