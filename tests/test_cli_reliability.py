"""``rwkvkit run`` shrugs off a damaged hash cache."""

from __future__ import annotations

import hashlib
import json

import pytest

from rwkvkit.run import file_sha256


# --- the checkpoint hash cache is only a cache -------------------------------------------------


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"key": 7}'])
def test_a_damaged_hash_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, model_paths, damage):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path))
    (tmp_path / "sha256.json").write_bytes(damage)
    path = model_paths["tiny"]
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected
    assert list(json.loads((tmp_path / "sha256.json").read_text()).values()) == [expected]


def test_an_unwritable_hash_cache_is_skipped(tmp_path, monkeypatch, model_paths):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "afile" / "cache"))  # cannot be created
    path = model_paths["tiny"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
