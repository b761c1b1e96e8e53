"""Directories are installed whole: readers see the old one or the new one, never a mix."""

from __future__ import annotations

from pathlib import Path

from aios.atomic import install_dir, make_staging_dir


def _staged(final_dir: Path, content: str) -> Path:
    staging = make_staging_dir(final_dir)
    (staging / "file.txt").write_text(content)
    return staging


def test_installs_into_a_new_path(tmp_path: Path):
    final_dir = tmp_path / "deep" / "out"
    assert install_dir(_staged(final_dir, "new"), final_dir, replace=False)
    assert (final_dir / "file.txt").read_text() == "new"
    assert [p.name for p in final_dir.parent.iterdir()] == ["out"]


def test_keeps_the_existing_directory_when_not_replacing(tmp_path: Path):
    final_dir = tmp_path / "out"
    install_dir(_staged(final_dir, "first"), final_dir, replace=False)
    assert not install_dir(_staged(final_dir, "second"), final_dir, replace=False)
    assert (final_dir / "file.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replaces_the_existing_directory_whole(tmp_path: Path):
    final_dir = tmp_path / "out"
    install_dir(_staged(final_dir, "first"), final_dir, replace=False)
    (final_dir / "stale.txt").write_text("from the old version")
    assert install_dir(_staged(final_dir, "second"), final_dir, replace=True)
    assert sorted(p.name for p in final_dir.iterdir()) == ["file.txt"]
    assert (final_dir / "file.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_installed_directory_has_normal_permissions(tmp_path: Path):
    import os
    import stat

    final_dir = tmp_path / "out"
    install_dir(_staged(final_dir, "new"), final_dir, replace=False)
    reference = tmp_path / "made-by-mkdir"
    os.mkdir(reference)  # what the umask gives any new directory (tempfile.mkdtemp would give 0700)
    assert stat.S_IMODE(final_dir.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
