"""The model cache: built once, atomically, survives interruption, detects corruption."""

import pytest

from uniprefill.models import store


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))


def _writer(calls):
    def build(out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"\x01" * 1000)

    return build


def test_built_once_then_returned_at_once():
    calls = []
    first = store.materialize("m", "r1", _writer(calls))
    second = store.materialize("m", "r1", _writer(calls))
    assert first == second == store.model_dir("m")
    assert len(calls) == 1
    store.verify(first)


def test_a_new_recipe_rebuilds():
    calls = []
    store.materialize("m", "r1", _writer(calls))
    store.materialize("m", "r2", _writer(calls))
    assert len(calls) == 2
    assert store.read_manifest(store.model_dir("m"))["recipe"] == "r2"


def test_interrupted_build_leaves_nothing_loadable():
    def crash(out):
        (out / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.materialize("m", "r1", crash)
    assert not store.model_dir("m").exists()
    assert not list(store.model_dir("m").parent.glob(".m.partial-*"))
    calls = []
    store.materialize("m", "r1", _writer(calls))
    assert len(calls) == 1


def test_truncated_file_is_not_complete_and_corruption_is_detected():
    path = store.materialize("m", "r1", _writer([]))
    (path / "weights.bin").write_bytes(b"\x01" * 999)
    assert not store.is_complete(path, "r1")
    (path / "weights.bin").write_bytes(b"\x02" * 1000)  # same size, other bytes
    assert store.is_complete(path, "r1")
    with pytest.raises(ValueError, match="corrupted"):
        store.verify(path)
