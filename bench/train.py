"""Training throughput: the round's trainer (stages.train) against a plain SentenceTransformerTrainer on the
same data in the same run, plus tokens/s and (on CUDA) peak memory for fp32 vs bf16.

    python -m bench.train [--model packaged:all-MiniLM-L6-v2] [--pairs 256] [--tokens 224]
    python -m bench.train --random-base   # BERT-base-sized random weights, for GPU throughput
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "river city music history solar energy water system database server network model search "
    "document training data learning language engine storage battery panel grid people study "
    "linked part long runs files folder often"
).split()


def make_pairs(count: int, tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        passage = " ".join(rng.choice(WORDS) for _ in range(tokens))
        query = " ".join(rng.choice(WORDS) for _ in range(12)) + f" {i}"
        negative = " ".join(rng.choice(WORDS) for _ in range(tokens))
        pairs.append({"query": query, "pos": passage, "neg": [negative]})
    return pairs


def random_bert_base(folder: Path) -> Path:
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from stages.models import resolve_model_path

    tokenizer_source = resolve_model_path("packaged:all-MiniLM-L6-v2")
    hf = folder / "bert-base-random"
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(hf)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=256)
    dim = (
        transformer.get_embedding_dimension()
        if hasattr(transformer, "get_embedding_dimension")
        else transformer.get_word_embedding_dimension()
    )
    model = SentenceTransformer(modules=[transformer, models.Pooling(dim, "mean"), models.Normalize()])
    model.save(str(folder / "st"))
    return folder / "st"


def plain_trainer(model_path: Path, pairs: list[dict], batch: int, out: Path, precision: str) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_path))
    data = Dataset.from_dict(
        {
            "anchor": [p["query"] for p in pairs],
            "positive": [p["pos"] for p in pairs],
            "negative_1": [p["neg"][0] for p in pairs],
        }
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        learning_rate=1e-5,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        batch_sampler="no_duplicates",
        dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model, scale=20.0)
    )
    started = time.monotonic()
    trainer.train()
    return (trainer.state.global_step * batch) / (time.monotonic() - started)


def main() -> None:
    import torch

    from daemon.logs import configure_logging
    from stages.models import resolve_model_path
    from stages.train import TrainParams, resolve_precision, train_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--random-base", action="store_true", help="BERT-base-sized random model")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=224, help="approximate words per passage")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    configure_logging("error", "console")
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_path = random_bert_base(root) if args.random_base else resolve_model_path(args.model)
        pairs = make_pairs(args.pairs, args.tokens)
        precisions = ["fp32", resolve_precision("auto")] if cuda else ["fp32"]
        print(
            f"device {device}; model {'BERT-base (random)' if args.random_base else args.model}; "
            f"{args.pairs} pairs, ~{args.tokens} words/passage, batch {args.batch}"
        )
        for precision in dict.fromkeys(precisions):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            plain = plain_trainer(model_path, pairs, args.batch, root / f"plain-{precision}", precision)
            params = TrainParams(
                batch_size=args.batch,
                learning_rate=1e-5,
                temperature=0.05,
                precision=precision if cuda else "auto",
                max_minutes=60,
                warmup_ratio=0.0,
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            outcome = train_model(model_path, root / f"ours-{precision}", pairs, params)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            ours = outcome.pairs_per_second
            tokens_per_s = ours * (args.tokens * 2 + 14)
            print(
                f"{precision:>5}: embedtune {ours:7.1f} pairs/s  plain ST trainer {plain:7.1f} pairs/s  "
                f"ratio {ours / plain:.2f}  ~{tokens_per_s:,.0f} tokens/s"
                + (f"  peak GPU memory {peak:.2f} GiB" if cuda else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
