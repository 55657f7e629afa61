"""Settings -> each pipeline step's parameters. One place, so the daemon's round, index sync, filter,
exports, `eval` and `search` encode and mine with the same options (stages/ never reads the settings)."""

from __future__ import annotations

from pathlib import Path

from daemon.settings import Settings


def encode_params(settings: Settings):
    """How every step that only encodes does it (index, search, filter, `eval`, exports): the configured
    backend, so a checked ONNX export of the version is used where there is one."""
    from stages.encoder import EncodeParams
    from state.layout import StateLayout

    model = settings.model
    return EncodeParams(
        model.device,
        model.query_instruction,
        model.encode_batch_size,
        batch_tokens=model.encode_batch_tokens,
        precision=model.encode_precision,
        backend=model.backend,
        quantize=model.quantize,
        exports_root=StateLayout(settings.paths.state_dir).exports,
    )


def torch_encode_params(settings: Settings):
    """The same options, in torch whatever the backend. A round compares versions on paired queries and a
    candidate has no export, so every model of a round encodes this way and the backend cannot tilt the
    gate; the export check uses it as its reference."""
    from dataclasses import replace

    return replace(encode_params(settings), backend="torch")


def negative_params(settings: Settings, corpus_only: bool = False):
    """With a teacher, the miner only encodes the corpus: the label step chooses the negatives."""
    from stages.round_steps import NegativeParams

    training = settings.training
    return NegativeParams(
        0 if corpus_only else training.hard_negatives,
        tuple(training.negative_range),
        training.negative_margin,
        training.seed,
    )


def label_params(settings: Settings):
    from stages.labels import LabelParams

    training = settings.training
    return LabelParams(
        negatives=training.hard_negatives,
        rank_range=(1, training.teacher_depth),
        keep_rank=training.teacher_keep_rank,
        repair=training.label_repair,
        student_margin=training.negative_margin,
        target_spread=training.temperature,
        seed=training.seed,
    )


def train_params(settings: Settings):
    from stages.train import TrainParams

    model = settings.model
    return params_from(
        TrainParams, settings.training, query_instruction=model.query_instruction, device=model.device
    )


def llm_config(settings: Settings):
    """The LLM client's configuration: the [llm] keys of the same names, the key from its variable."""
    from stages.llm import LlmConfig, StructuredMode

    return params_from(
        LlmConfig,
        settings.llm,
        api_key=settings.llm_api_key(),
        structured=StructuredMode(settings.llm.structured),
    )


def params_from(cls, section, **explicit):
    """A step's parameter dataclass from the settings section whose keys share its field names (the
    settings document them once); `explicit` values come from elsewhere or need converting."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(cls)}
    values = {name: getattr(section, name) for name in names if hasattr(section, name)}
    return cls(**{**values, **explicit})


def eval_plan(settings: Settings, serving_path: Path | None = None):
    from daemon.serving import all_languages_share
    from stages.round_steps import EvalPlan

    promotion = settings.promotion
    # Headings are human signal only when they were not the training queries themselves.
    use_structure = settings.llm.enabled or settings.synthesis.pseudo_method != "heading"
    return EvalPlan(
        promotion.metric,
        use_structure,
        promotion.user_eval,
        promotion.user_eval_query_key,
        promotion.user_eval_positive_key,
        promotion.guard_eval,
        promotion.eval_pool,
        served_mode=settings.index.mode if settings.index.enabled else "",
        analyzer=settings.index.analyzer,
        bm25_weight=settings.index.bm25_weight,
        serving_model=str(serving_path or ""),
        all_languages_share=all_languages_share(settings),
        candidates=settings.index.candidates,
    )


def merge_params(settings: Settings):
    from stages.round_steps import MergeParams

    return MergeParams(
        tuple(settings.promotion.merge_weights),
        settings.promotion.merge_with_data,
        max(1, min(3, settings.training.hard_negatives)),
    )


def gate_params(settings: Settings):
    from stages.round_steps import GateParams

    promotion = settings.promotion
    return GateParams(
        promotion.metric,
        promotion.min_gain,
        promotion.human_tolerance,
        promotion.max_guard_drop,
        promotion.synthetic_only_min_gain,
        promotion.bootstrap_samples,
        settings.training.seed,
        promotion.asked_min_gain,
        promotion.assessor_only_min_gain,
        promotion.ppi_min_gold,
        promotion.asked_min_queries,
    )
