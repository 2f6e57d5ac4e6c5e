"""Removing cmm's folder: only cmm's files, never through a link."""

from __future__ import annotations

from pathlib import Path

from cmm.config import removal


def test_remove_config_dir_removes_only_cmms_files(tmp_path: Path) -> None:
    folder = tmp_path / ".cmm"
    folder.mkdir()
    own = ["ca.crt", "ca.key", "server.crt", "server.key", ".env", "mappings.toml", "cmm.pid", "cmm.log",
           "cmm.log.1", "cmm.log.3", "anthropic-ip.cache", "cmm.state.json", ".ca.key.x1y2.tmp", ".env.abc.tmp"]
    for name in own:
        (folder / name).write_text("x")
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()

    result = removal.remove_config_dir(folder)
    assert sorted(p.name for p in result.removed) == sorted(own)
    assert sorted(p.name for p in result.left) == ["notes.txt", "sub"]
    assert not result.folder_removed and (folder / "notes.txt").read_text() == "mine"

    (folder / "notes.txt").unlink()
    (folder / "sub").rmdir()
    (folder / "ca.crt").write_text("x")
    assert removal.remove_config_dir(folder) == removal.RemovedFolder((folder / "ca.crt",), (), True)
    assert not folder.exists()
    assert removal.remove_config_dir(folder) == removal.RemovedFolder((), (), False)


def test_remove_config_dir_never_follows_a_symlinked_file(tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    precious = tmp_path / "precious"
    precious.write_text("keep")
    (folder / "ca.crt").symlink_to(precious)
    assert removal.remove_config_dir(folder).folder_removed
    assert precious.read_text() == "keep"
