"""Fine-tuning with the sentence-transformers trainer over mined negatives.

The loss is `training.loss` (stages/losses.py): contrastive MNRL with scale = 1/temperature (CachedMNRL
when `cached_batch` is set, so a large batch fits in small memory), the teacher-score losses MarginMSE and
KL, or a weighted sum. The query instruction is applied to the query column only, as BGE models expect;
a model that declares a passage prompt (E5) gets it on the passage columns.
bf16 (or fp16) on CUDA, all cores on CPU. Runs in the round's child process.
A multilingual model's word-embedding table is frozen by default (`freeze_word_embeddings`).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("embedtune.train")


@dataclass
class TrainParams:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    cached_batch: int | str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    max_minutes: float = 20.0
    query_instruction: str = ""
    seed: int = 42
    device: str = "auto"
    loss: str = "mnrl"
    freeze_word_embeddings: bool | str = "auto"


@dataclass
class TrainOutcome:
    steps: int
    total_steps: int
    final_loss: float | None
    seconds: float
    pairs_per_second: float
    stopped_early: bool
    precision: str
    word_embeddings_frozen: bool = False
    optimized_parameters: int = 0  # parameters the optimiser updated (0: no step was run)


ProgressFn = Callable[[int, int, float | None], None]


def build_dataset(examples: list[dict], with_scores: bool = False):
    """Columns anchor, positive, negative_1..k; every row gets the same number of negatives. With scores,
    a `label` column holds the teacher's scores of [positive, negative_1..k] (rows without them are left
    out: a teacher loss cannot learn from a row it has no labels for)."""
    from datasets import Dataset

    if with_scores:
        examples = [e for e in examples if e.get("scores") and len(e["scores"]) == len(e["neg"]) + 1]
    n_neg = min((len(example["neg"]) for example in examples), default=0)
    columns: dict[str, list[str]] = {"anchor": [], "positive": []}
    for k in range(n_neg):
        columns[f"negative_{k + 1}"] = []
    for example in examples:
        columns["anchor"].append(example["query"])
        columns["positive"].append(example["pos"])
        for k in range(n_neg):
            columns[f"negative_{k + 1}"].append(example["neg"][k])
    if with_scores:
        columns["label"] = [[float(x) for x in example["scores"][: n_neg + 1]] for example in examples]
    return Dataset.from_dict(columns)


def _warmup_steps(ratio: float, examples: int, batch_size: int, epochs: float) -> int:
    """Warm-up as whole steps, rounded down: a tiny round must not spend its only step at lr 0."""
    steps = math.ceil(max(1, examples // batch_size) * epochs)
    return int(ratio * steps)


def _texts(example: dict) -> set[str]:
    return {example["query"], example["pos"], *example.get("neg", [])}


def feasible_batch_size(examples: list[dict], wanted: int, seed: int = 0) -> int:
    """Largest batch size <= wanted for which the trainer can fill a batch without repeated texts.

    The trainer's no-duplicates sampler drops batches it cannot fill; on a small corpus where mined
    negatives are other pairs' positives, a batch of `wanted` may be impossible and the epoch would
    run zero steps. A size counts as feasible when a greedy fill succeeds in a few shuffled orders,
    as the sampler's own fill is greedy over a shuffled order.
    """
    rng = random.Random(seed)
    texts = [_texts(example) for example in examples]
    orders = [list(range(len(texts)))]
    for _ in range(3):
        orders.append(rng.sample(orders[0], len(orders[0])))
    size = max(2, min(wanted, len(examples)))
    while size > 2 and not all(_greedy_fills(texts, order, size) for order in orders):
        size -= 1
    return size


def _greedy_fills(texts: list[set[str]], order: list[int], size: int) -> bool:
    seen: set[str] = set()
    filled = 0
    for i in order:
        if seen.isdisjoint(texts[i]):
            seen |= texts[i]
            filled += 1
            if filled == size:
                return True
    return False


CPU_CACHED_BATCH = 8


def resolve_cached_batch(cached_batch: int | str, on_cpu: bool) -> int:
    """ "auto": GradCache mini-batches of 8 on the CPU, where the whole batch's activations (32 rows x a
    query, a positive and 3 negatives at 256 tokens) peaked at 12 GB and the cached loss at 2.1 GB with no
    loss of speed (bench/train_memory.py); off on a GPU, whose memory holds the batch and where the extra
    forward pass would cost time."""
    if cached_batch == "auto":
        return CPU_CACHED_BATCH if on_cpu else 0
    return int(cached_batch)


# "auto" freezes the input word embeddings of vocabularies at least this large: multilingual-e5-small's
# 250k-token table is 96M of its 118M weights, and frozen, its training peak on the CPU fell from 4.1 GB
# to 2.5 GB, 5-7% faster (docs/benchmarks.md); English BERTs' 30k-token tables stay trained.
FREEZE_VOCAB_MIN = 100_000


def resolve_freeze_word_embeddings(setting: bool | str, vocab_size: int) -> bool:
    if setting == "auto":
        return vocab_size >= FREEZE_VOCAB_MIN
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"freeze_word_embeddings {setting!r}: use true, false or 'auto'")


def _word_embeddings(model):
    """The transformer's input word-embedding table, or None for a model without one to find."""
    try:
        embeddings = model[0].auto_model.get_input_embeddings()
    except (AttributeError, IndexError, KeyError, NotImplementedError, TypeError):
        return None
    weight = getattr(embeddings, "weight", None)
    return weight if weight is not None and weight.dim() == 2 else None


def apply_word_embedding_freeze(model, setting: bool | str) -> bool:
    """Freeze (or keep training) the word embeddings; True when frozen. A round's pairs use ~2% of a
    250k-token table's rows, yet its gradient and AdamW's moments are dense over all of them; frozen,
    the table needs neither (the trainer's optimiser takes only parameters that require grad,
    transformers' Trainer.create_optimizer)."""
    weight = _word_embeddings(model)
    if weight is None:
        if setting is True:
            log.warning("word_embeddings_not_found", reason="the model exposes no input embeddings")
        return False
    vocab_size = int(weight.shape[0])
    frozen = resolve_freeze_word_embeddings(setting, vocab_size)
    weight.requires_grad_(not frozen)
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "word_embeddings_frozen",
            vocab_size=vocab_size,
            excluded_parameters=weight.numel(),
            trainable_parameters=trainable,
            setting=setting,
        )
    return frozen


def _optimized_parameters(trainer) -> int:
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return 0
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def resolve_precision(precision: str, device: str = "auto") -> str:
    """Half precision only where training runs on a GPU: `model.device = "cpu"` on a CUDA host trains on
    the CPU, where bf16 autocast is slow and fp16 fails."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(precision, device, cuda, cuda and torch.cuda.is_bf16_supported())


def choose_precision(precision: str, device: str, cuda_available: bool, bf16_supported: bool) -> str:
    on_gpu = cuda_available and (device == "auto" or device.startswith("cuda"))
    if not on_gpu:
        return "fp32"
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported else "fp16"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (systemd's CPUAffinity=, taskset) capped by
    a cgroup v2 quota (systemd's CPUQuota=, a container's --cpus). os.cpu_count() counts the machine's
    cores, and as many torch threads as cores on a 2-CPU quota only makes them wait for each other."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _any_rank(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _record_anchors(trainer) -> list[str]:
    """The anchors this process's data loader fed to training (a rank's shard, for the audit trail)."""
    recording = _RecordingCollator(trainer.data_collator)
    trainer.data_collator = recording
    return recording.seen


class _RecordingCollator:
    """The trainer's collator, unchanged, noting each row's anchor on the way (the trainer reads the
    collator's attributes, so everything else is delegated)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def __call__(self, features):
        self.seen.extend(str(feature.get("anchor", "")) for feature in features)
        return self.inner(features)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def shard_log_dir(output_dir: Path) -> Path:
    return output_dir.parent / (output_dir.name + ".shards")


def write_shard_log(output_dir: Path, rank: int, anchors: list[str]) -> None:
    folder = shard_log_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "rows": len(anchors), "anchors": anchors}, ensure_ascii=False)
    )


def column_prompts(columns: list[str], query_prefix: str, passage_prefix: str) -> dict[str, str] | None:
    """The trainer's per-column prompts: the query prefix on the anchor, the passage prefix (E5's
    `passage: `) on the positive and every negative, as the model sees them when it encodes."""
    prompts = {"anchor": query_prefix} if query_prefix else {}
    if passage_prefix:
        prompts.update(
            {name: passage_prefix for name in columns if name == "positive" or name.startswith("negative_")}
        )
    return prompts or None


def _fit(model, dataset, loss, batch_size: int, params: TrainParams, progress, state: dict, started: float):
    """One trainer run at this batch size: (trainer, anchors seen, train() result)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    precision = resolve_precision(params.precision, params.device)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(state["work_dir"]),
        num_train_epochs=params.epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=params.learning_rate,
        warmup_steps=_warmup_steps(params.warmup_ratio, len(dataset), batch_size, params.epochs),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        batch_sampler="no_duplicates",
        prompts=state["prompts"],
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        seed=params.seed,
        dataloader_drop_last=len(dataset) > batch_size,
        disable_tqdm=True,
        use_cpu=state["on_cpu"],
    )

    class Progress(TrainerCallback):
        def on_log(self, _args, control_state, control, logs=None, **_):
            if logs and "loss" in logs:
                state["loss"] = float(logs["loss"])
            if progress:
                progress(control_state.global_step, control_state.max_steps, state["loss"])

        def on_step_end(self, step_args, control_state, control, **_):
            stop = time.monotonic() - started > params.max_minutes * 60
            if world_size > 1:
                stop = _any_rank(stop, step_args.device)  # ranks must stop at the same step or they hang
            if stop and control_state.global_step < control_state.max_steps:  # the last step ends anyway
                state["stopped"] = True
                control.should_training_stop = True
            return control

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[Progress()]
    )
    seen = _record_anchors(trainer)
    return trainer, seen, trainer.train()


def train_model(
    base_path: Path,
    output_dir: Path,
    examples: list[dict],
    params: TrainParams,
    progress: ProgressFn | None = None,
    model=None,
) -> TrainOutcome:
    import torch

    from stages.losses import build_loss, needs_teacher
    from stages.models import load_embedder, model_prompts

    precision = resolve_precision(params.precision, params.device)
    on_cpu = not torch.cuda.is_available() or params.device == "cpu"
    if on_cpu:
        torch.set_num_threads(usable_cpus())
    if model is None:
        model = load_embedder(base_path, params.device)
    frozen = apply_word_embedding_freeze(model, params.freeze_word_embeddings)
    if params.gradient_checkpointing:
        transformer = model[0].auto_model
        if hasattr(transformer, "gradient_checkpointing_enable"):
            transformer.gradient_checkpointing_enable()
    with_scores = needs_teacher(params.loss)
    dataset = build_dataset(examples, with_scores)
    if with_scores and len(dataset) == 0:
        raise ValueError(f"training.loss {params.loss!r} needs teacher scores and no example has them")
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    # Under torchrun each rank sees its own shard; in-batch negatives are gathered from every rank, so
    # the effective batch (and the number of negatives per query) grows with the number of devices.
    if len(dataset) < 2:  # no batch can be formed: no step, which the round turns into a rejection
        return TrainOutcome(0, 0, None, 0.0, 0.0, False, precision, frozen)
    loss = build_loss(
        params.loss,
        model,
        params.temperature,
        resolve_cached_batch(params.cached_batch, on_cpu),
        gather_across_devices=world_size > 1,
    )
    batch_size = feasible_batch_size(examples, params.batch_size)
    if world_size > 1:  # every rank needs at least one batch of its own, or the ranks disagree on steps
        batch_size = max(2, min(batch_size, len(dataset) // world_size))
    work_dir = output_dir.parent / (output_dir.name + ".work")
    started = time.monotonic()
    query_prompt, passage_prompt = model_prompts(base_path)
    prompts = column_prompts(dataset.column_names, params.query_instruction or query_prompt, passage_prompt)
    state = {"stopped": False, "loss": None, "work_dir": work_dir, "on_cpu": on_cpu, "prompts": prompts}
    while True:
        trainer, seen, result = _fit(model, dataset, loss, batch_size, params, progress, state, started)
        # The no-duplicates sampler fills batches greedily in its own shuffled order, which
        # feasible_batch_size can only sample: a size it judged feasible may still fill no batch in the
        # order the sampler draws, and the round would end with no step. No step was taken, so the
        # model is untouched: try again with a smaller batch (one process only; ranks must agree).
        if trainer.state.global_step > 0 or batch_size <= 2 or world_size > 1:
            break
        batch_size = max(2, batch_size // 2)
    seconds = time.monotonic() - started
    if world_size > 1:
        write_shard_log(output_dir, rank, seen)
    if rank == 0:  # one writer of the candidate, whatever the number of ranks
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save(str(output_dir))
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    steps = trainer.state.global_step
    pairs = steps * batch_size * world_size
    return TrainOutcome(
        steps=steps,
        total_steps=trainer.state.max_steps,
        final_loss=state["loss"] if state["loss"] is not None else getattr(result, "training_loss", None),
        seconds=seconds,
        pairs_per_second=pairs / seconds if seconds else 0.0,
        stopped_early=state["stopped"],
        precision=precision,
        word_embeddings_frozen=frozen,
        optimized_parameters=_optimized_parameters(trainer),
    )
