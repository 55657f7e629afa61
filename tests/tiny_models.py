"""Tiny real models for tests: a 2-layer BERT saved as a sentence-transformers folder, and a 2-layer
cross-encoder, both written and read through the libraries' own save/load code paths."""

from __future__ import annotations

import string
from pathlib import Path

ENGLISH_WORDS = """the a an of to in and or is are was were be for on with as by at from that this it
what which who how when where why does do did can will about between model models retrieval search
query queries document documents passage chunk training data learning machine neural network
embedding embeddings vector index language english chinese river city history music energy
solar power water system computer science database server file files folder daemon round""".split()
CHINESE_TEXT = (
    "机器学习是人工智能的一个分支它使计算机能够从数据中学习深度神经网络效果很好关于内容什么"
    "中国北京上海城市河流历史音乐能源太阳水系统电脑科学数据库服务器文件夹问题回答段落为如何哪里"
)


def build_vocab() -> list[str]:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += ["##" + ch for ch in string.ascii_lowercase + string.digits]
    vocab += list(dict.fromkeys(CHINESE_TEXT))
    vocab += list("。！？；，、：“”（）…")
    vocab += [w for w in dict.fromkeys(ENGLISH_WORDS) if w not in vocab]
    return vocab


def build_tokenizer(folder: Path, tokenize_chinese_chars: bool = True):
    """A WordPiece tokenizer over the small vocabulary, checked to know its words.

    transformers 5 reads the vocabulary from `vocab=` (a dict or a file path); the older `vocab_file=`
    is silently ignored there and every word becomes [UNK], which once left every test model blind to
    its input (all texts of one length embedded alike)."""
    from transformers import BertTokenizerFast

    words = build_vocab()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(
        vocab={word: index for index, word in enumerate(words)},
        do_lower_case=True,
        tokenize_chinese_chars=tokenize_chinese_chars,
    )
    ids = tokenizer("river 河流")["input_ids"]
    if tokenizer.unk_token_id in ids:
        raise RuntimeError(f"tiny tokenizer maps known words to [UNK]: {ids}")
    return tokenizer


def tiny_bert_config(**extra):
    """2 layers, 32 dimensions, the small vocabulary: seconds to train, real code paths."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(build_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **extra,
    )


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A plain Hugging Face BERT folder (config, weights, WordPiece tokenizer)."""
    import torch
    from transformers import BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    BertModel(tiny_bert_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_embedder(folder: Path, pooling: str = "mean", seed: int = 0) -> Path:
    """A sentence-transformers folder around the tiny BERT (mean pooling + Normalize by default)."""
    from sentence_transformers import SentenceTransformer, models

    hf = build_tiny_bert(folder.parent / (folder.name + "-hf"), seed)
    transformer = models.Transformer(str(hf), max_seq_length=128)
    dim = (
        transformer.get_embedding_dimension()
        if hasattr(transformer, "get_embedding_dimension")
        else transformer.get_word_embedding_dimension()
    )
    pool = models.Pooling(dim, pooling_mode=pooling)
    model = SentenceTransformer(modules=[transformer, pool, models.Normalize()], device="cpu")
    model.save(str(folder))
    return folder


def build_tiny_cross_encoder(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
