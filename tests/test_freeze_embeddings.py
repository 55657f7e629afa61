"""`training.freeze_word_embeddings`: a frozen word-embedding table leaves training bit-identical and out
of the optimiser, the rest of the model still learns, and "auto" freezes only large vocabularies."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.settings import ConfigError, Settings, load_settings

EXAMPLES = [
    {
        "query": f"river city {i} history",
        "pos": f"the river {i} floods the city",
        "neg": [f"solar energy {i}"],
    }
    for i in range(12)
]


def _train(model_path: Path, out: Path, setting):
    """Train a few steps from `model_path`; the model before and after, and the outcome."""
    import copy

    from stages.models import load_embedder
    from stages.train import TrainParams, train_model

    model = load_embedder(model_path, "cpu")
    before = copy.deepcopy(model.state_dict())
    params = TrainParams(
        batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        device="cpu",
        precision="fp32",
        cached_batch=0,
        freeze_word_embeddings=setting,
    )
    outcome = train_model(model_path, out, EXAMPLES, params, model=model)
    assert outcome.steps > 0
    return before, model.state_dict(), outcome


def _word_key(state: dict) -> str:
    (key,) = [name for name in state if name.endswith("embeddings.word_embeddings.weight")]
    return key


def _changed_others(before: dict, after: dict, word: str) -> list[str]:
    return [
        name
        for name, tensor in before.items()
        if name != word and tensor.is_floating_point() and not after[name].equal(tensor)
    ]


def test_frozen_word_embeddings_stay_bit_identical_while_the_rest_trains(tiny_embedder, tmp_path):
    before, after, outcome = _train(tiny_embedder, tmp_path / "out", True)
    word = _word_key(before)
    assert after[word].equal(before[word])
    assert any("encoder.layer" in name for name in _changed_others(before, after, word))
    assert outcome.word_embeddings_frozen is True
    total = sum(t.numel() for t in before.values() if t.is_floating_point())
    # the optimiser holds every trained weight but the table (buffers such as position_ids are not floats)
    assert 0 < outcome.optimized_parameters <= total - before[word].numel()
    from stages.models import load_embedder

    saved = load_embedder(tmp_path / "out", "cpu").state_dict()
    assert saved[word].equal(before[word])


def test_trained_word_embeddings_change(tiny_embedder, tmp_path):
    before, after, outcome = _train(tiny_embedder, tmp_path / "out", False)
    word = _word_key(before)
    assert not after[word].equal(before[word])
    assert outcome.word_embeddings_frozen is False
    assert outcome.optimized_parameters >= before[word].numel()


def test_auto_trains_a_small_vocabulary(tiny_embedder, tmp_path):
    before, after, outcome = _train(tiny_embedder, tmp_path / "out", "auto")
    word = _word_key(before)
    assert outcome.word_embeddings_frozen is False
    assert not after[word].equal(before[word])


@pytest.fixture(scope="module")
def large_vocab_embedder(tmp_path_factory) -> Path:
    """The tiny BERT with a 120,000-row table (multilingual-sized vocabulary, 32 dimensions): the
    tokenizer uses only its first rows, as a corpus uses a few of a large table's tokens."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    from tests.tiny_models import build_tokenizer, tiny_bert_config

    root = tmp_path_factory.mktemp("large-vocab")
    hf = root / "hf"
    hf.mkdir()
    config = tiny_bert_config()
    config.vocab_size = 120_000
    torch.manual_seed(0)
    BertModel(config).save_pretrained(hf)
    build_tokenizer(hf).save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=64)
    pooling = models.Pooling(config.hidden_size, pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(
        str(root / "st")
    )
    return root / "st"


def test_auto_freezes_a_large_vocabulary(large_vocab_embedder, tmp_path):
    before, after, outcome = _train(large_vocab_embedder, tmp_path / "out", "auto")
    word = _word_key(before)
    assert before[word].shape[0] == 120_000
    assert outcome.word_embeddings_frozen is True
    assert after[word].equal(before[word])
    assert _changed_others(before, after, word)


def test_resolution_threshold_and_bad_values():
    from stages.train import FREEZE_VOCAB_MIN, resolve_freeze_word_embeddings

    assert resolve_freeze_word_embeddings("auto", FREEZE_VOCAB_MIN) is True
    assert resolve_freeze_word_embeddings("auto", FREEZE_VOCAB_MIN - 1) is False
    assert resolve_freeze_word_embeddings(True, 10) is True
    assert resolve_freeze_word_embeddings(False, 250_037) is False
    with pytest.raises(ValueError, match="freeze_word_embeddings"):
        resolve_freeze_word_embeddings("yes", 10)


def test_setting_defaults_to_auto_and_reaches_the_train_params():
    from daemon.step_params import train_params

    assert Settings().training.freeze_word_embeddings == "auto"
    settings = Settings.model_validate({"training": {"freeze_word_embeddings": False}})
    assert train_params(settings).freeze_word_embeddings is False


@pytest.mark.parametrize("value", ['"no"', "1", '"true"'])
def test_invalid_setting_names_the_key(tmp_path, value):
    path = tmp_path / "bad.toml"
    path.write_text(f"[training]\nfreeze_word_embeddings = {value}\n")
    with pytest.raises(ConfigError, match="training.freeze_word_embeddings"):
        load_settings(path, env=False)


def test_torchrun_job_carries_the_setting(tmp_path):
    """The torchrun path serialises TrainParams into the job file every rank reads."""
    import json

    from daemon.train_worker import write_job
    from stages.train import TrainParams

    path = write_job(
        tmp_path, tmp_path / "base", tmp_path / "out", [], TrainParams(freeze_word_embeddings=True)
    )
    assert TrainParams(**json.loads(path.read_text())["params"]).freeze_word_embeddings is True


def test_two_torchrun_ranks_keep_the_table_frozen(tiny_embedder, tmp_path):
    """DDP over ranks with a frozen parameter: the job carries the setting, the ranks agree, and the
    candidate rank 0 writes has the base's table."""
    from daemon.distributed import TorchrunTrainer
    from stages.models import load_embedder
    from stages.train import TrainParams

    output = tmp_path / "round" / "candidate"
    output.parent.mkdir()
    params = TrainParams(
        batch_size=4, learning_rate=1e-3, device="cpu", precision="fp32", freeze_word_embeddings=True
    )
    outcome = TorchrunTrainer(nproc_per_node=2)(tiny_embedder, output, EXAMPLES, params)
    assert outcome.steps > 0 and outcome.word_embeddings_frozen is True
    before = load_embedder(tiny_embedder, "cpu").state_dict()
    after = load_embedder(output, "cpu").state_dict()
    word = _word_key(before)
    assert after[word].equal(before[word])
    assert _changed_others(before, after, word)
