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


def test_token_budget_batches_go_longest_first_within_the_budget():
    from stages.encoder import token_budget_batches

    lengths = [10, 250, 12, 240, 9, 256, 11, 30]
    batches = token_budget_batches(lengths, budget=512, max_batch=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == [[5, 1], [3, 7], [2, 6, 0], [4]]  # 2 x 256 tokens fill 512; short texts go 3 at a time
    for batch in batches:
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * lengths[batch[0]] <= 512)
        assert all(lengths[batch[0]] >= lengths[i] for i in batch)
    assert token_budget_batches([600], budget=512, max_batch=8) == [[0]]  # longer than the budget: alone


def test_budget_batching_gives_the_vectors_of_one_call(tiny_embedder):
    """Batches cut by tokens (the CPU default) change only the order of work, not the vectors."""
    from stages.encoder import EncodeParams, Encoder

    texts = [("river " * n).strip() for n in (1, 40, 3, 25, 7, 60, 2)]
    budget = Encoder(tiny_embedder, EncodeParams(device="cpu", batch_tokens=64))
    assert budget._batch_tokens() == 64 and budget._token_lengths(texts) is not None
    whole = Encoder(tiny_embedder, EncodeParams(device="cpu", batch_tokens=10**9, batch_size=64))
    assert Encoder(tiny_embedder, EncodeParams(device="cpu"))._batch_tokens() == 2048
    assert np.allclose(budget.passages(texts), whole.passages(texts), atol=1e-5)


def test_half_precision_encodes_near_fp32_and_is_cached_apart(tiny_embedder, tmp_path):
    """model.encode_precision: "auto" stays fp32 on a CPU and means fp16 on a GPU; a half-precision torch
    model (bf16 here, which a CPU runs) gives vectors near fp32's, as float32, under its own cache key."""
    from stages.encoder import EncodeParams, Encoder, encode_precision

    assert encode_precision("auto", "cpu") == "fp32" and encode_precision("auto", "cuda:0") == "fp16"
    assert encode_precision("bf16", "cpu") == "bf16"
    texts = [("river " * n).strip() for n in (1, 40, 3, 25)]
    full = Encoder(tiny_embedder, EncodeParams(device="cpu"), cache_root=tmp_path)
    half = Encoder(tiny_embedder, EncodeParams(device="cpu", precision="bf16"), cache_root=tmp_path)
    assert full.runtime == "torch" and half.runtime == "torch bf16"
    import torch

    assert (
        next(half.model.parameters()).dtype == torch.bfloat16 and half.cache.model_key != full.cache.model_key
    )
    vectors = half.passages(texts)
    assert vectors.dtype == np.float32
    assert (vectors * full.passages(texts)).sum(axis=1).min() > 0.98
