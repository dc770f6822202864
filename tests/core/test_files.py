"""cvcore.files: the one output-path check and the one atomic write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cvcore.errors import InputError
from cvcore.files import atomic_output, check_output_path, write_text_atomic


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "new.csv", "a\n")
        assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("x")
        kept.chmod(0o640)
        write_text_atomic(kept, "b\n")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "b\n"
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_output_paths_that_cannot_or_must_not_be_written(tmp_path: Path) -> None:
    src = tmp_path / "run.db"
    src.write_bytes(b"store")
    (tmp_path / "link.db").symlink_to(src)
    cases = {
        tmp_path: "got a directory",
        tmp_path / "missing" / "x.csv": "got no such directory",
        src / "x.csv": "got a file",
        tmp_path / "link.db": "differ from the input",
    }
    for path, words in cases.items():
        with pytest.raises(InputError, match=words) as info:
            check_output_path(path, sources=[src])
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="pass --force"):
        check_output_path(src, force=False)
    assert check_output_path(tmp_path / "new.csv", force=False) == tmp_path / "new.csv"
    assert src.read_bytes() == b"store"
