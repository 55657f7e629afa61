"""The embedding cache shared by the daemon's children: one atomic file, merged on save."""

from __future__ import annotations

import numpy as np

from stages.embed_cache import CACHE_FILE, EmbeddingCache


def _encode(texts):
    return np.asarray([[float(len(t)), float(sum(map(ord, t)) % 97)] for t in texts], dtype=np.float32)


def test_two_processes_saving_the_same_folder_keep_both_and_never_mismatch(tmp_path):
    """Two children load the cache, each encodes different chunks and saves. With two files replaced one
    after the other, a reader could pair one save's keys with the other's vectors (same length: silently
    wrong vectors), and the later save dropped the earlier one's entries."""
    first, second = EmbeddingCache(tmp_path, "model"), EmbeddingCache(tmp_path, "model")
    first.get_many(["a", "b"], ["alpha", "beta"], _encode)
    second.get_many(["c", "d"], ["gamma", "delta!"], _encode)
    first.save()
    second.save()
    reader = EmbeddingCache(tmp_path, "model")
    called = []
    vectors = reader.get_many(
        ["a", "b", "c", "d"], ["alpha", "beta", "gamma", "delta!"], lambda t: called.append(t)
    )
    assert not called  # every vector came from the cache
    np.testing.assert_array_equal(vectors, _encode(["alpha", "beta", "gamma", "delta!"]))
    assert [p.name for p in reader.folder.iterdir() if p.suffix == ".npz"] == [CACHE_FILE]


def test_the_earlier_two_file_form_is_read_once_and_replaced(tmp_path):
    cache = EmbeddingCache(tmp_path, "model")
    cache.folder.mkdir(parents=True)
    (cache.folder / "keys.txt").write_text("x\ny")
    np.save(cache.folder / "vectors.npy", _encode(["xx", "yyy"]))
    legacy = EmbeddingCache(tmp_path, "model")
    np.testing.assert_array_equal(legacy.get_many(["y"], ["unused"], _encode), _encode(["yyy"]))
    legacy.get_many(["z"], ["zz"], _encode)
    legacy.save()
    assert not (cache.folder / "keys.txt").exists() and (cache.folder / CACHE_FILE).exists()
    assert set(EmbeddingCache(tmp_path, "model")._vectors) == {"x", "y", "z"}
