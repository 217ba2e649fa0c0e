"""hyperback key export: a copy of an encrypted repository's wrapped key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run

from host_agent.storage import keys

PASSPHRASE = "key export passphrase"


def test_an_exported_key_brings_back_a_repository_whose_key_document_was_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, image = tmp_path / "repo", tmp_path / "vm1.img"
    image.write_bytes(os.urandom(300_000))
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    run("init", repo, "--encryption", "passphrase", "--passphrase-file", tmp_path / "pass")
    monkeypatch.setenv(keys.ENV_PASSPHRASE, PASSPHRASE)
    run("backup", "--repo", repo, "--name", "vm1/vda", image)
    run("key", "export", repo, tmp_path / "kept.key")
    assert (tmp_path / "kept.key").read_bytes() == (repo / keys.KEY_FILE).read_bytes()

    (repo / keys.KEY_FILE).unlink()
    assert_one_line_error(run("verify", "--repo", repo, check=False), 2, "does not exist", "key export")
    (repo / keys.KEY_FILE).write_bytes((tmp_path / "kept.key").read_bytes())
    run("restore", "--repo", repo, "vm1/vda@latest", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


def test_key_export_refuses_a_wrong_passphrase_an_existing_file_and_an_unencrypted_repository(
        tmp_path: Path) -> None:
    (tmp_path / "pass").write_text(PASSPHRASE)
    run("init", tmp_path / "sealed", "--encryption", "passphrase", "--passphrase-file", tmp_path / "pass")
    (tmp_path / "wrong").write_text("not it")
    proc = run("key", "export", tmp_path / "sealed", tmp_path / "k", "--passphrase-file", tmp_path / "wrong",
               check=False)
    assert_one_line_error(proc, 2, "wrong passphrase")
    assert not (tmp_path / "k").exists(), "an export nobody can open was written"
    (tmp_path / "k").write_text("something else")
    proc = run("key", "export", tmp_path / "sealed", tmp_path / "k", "--passphrase-file", tmp_path / "pass",
               check=False)
    assert_one_line_error(proc, 2, "cannot write")
    assert (tmp_path / "k").read_text() == "something else"
    run("init", tmp_path / "clear")
    assert_one_line_error(run("key", "export", tmp_path / "clear", tmp_path / "k2", check=False), 2,
                          "not encrypted")
