"""One typed settings object, loaded from config.toml and validated with errors that name the key.

Kept free of heavy imports: `embedtune status` loads it too.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.base_choice import AUTO

CONFIG_ENV = "EMBEDTUNE_CONFIG"
PACKAGED_PREFIX = "packaged:"


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class PathsSettings(_Section):
    inbox: Path = Path("~/embedtune/inbox")
    state_dir: Path = Path("~/embedtune/state")

    @field_validator("inbox", "state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(os.path.expandvars(str(value))).expanduser()


class IngestSettings(_Section):
    settle_seconds: float = Field(2.0, ge=0)
    max_file_mb: float = Field(50.0, gt=0)
    workers: int = Field(2, ge=1, le=64)
    processes: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"  # daemon/ingest_process.py
    rescan_minutes: float = Field(10.0, ge=0)
    retire_samples: Literal["keep", "drop"] = "keep"
    chunk_tokens: int = Field(200, ge=16, le=8192)
    chunk_overlap: int = Field(32, ge=0)
    min_chunk_chars: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _overlap_smaller(self) -> IngestSettings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("ingest.chunk_overlap must be smaller than ingest.chunk_tokens")
        return self


class LlmSettings(_Section):
    url: str = ""
    model: str = "qwen2.5-7b-instruct"
    api_key_env: str = "EMBEDTUNE_LLM_API_KEY"
    concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_retries: int = Field(5, ge=0, le=50)
    max_retry_after_s: float = Field(120.0, gt=0)
    reask_invalid: int = Field(2, ge=0, le=10)
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(30.0, gt=0)
    temperature: float = Field(0.7, ge=0, le=2)
    structured: Literal["auto", "json_schema", "json_object", "off"] = "auto"
    question_tokens: int = Field(64, ge=8, le=4096)
    rewrite_tokens: int = Field(48, ge=8, le=4096)
    score_tokens: int = Field(8, ge=2, le=256)
    reply_overhead_tokens: int = Field(64, ge=0, le=4096)

    @property
    def enabled(self) -> bool:
        return bool(self.url.strip())


class SynthesisSettings(_Section):
    questions_per_chunk: int = Field(2, ge=1, le=20)
    rewrites_per_question: int = Field(1, ge=0, le=10)
    judge_threshold: float = Field(0.6, ge=0, le=1)
    featured_percentage: float = Field(0.2, gt=0, le=1)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    pseudo_method: Literal["heading", "inverse_cloze", "span", "keyphrase"] = "inverse_cloze"
    pseudo_per_chunk: int = Field(1, ge=1, le=10)
    filter_candidates: int = Field(50, ge=2, le=1000)
    filter_batch: int = Field(256, ge=1)
    seed: int = 0


class ModelSettings(_Section):
    # "auto": the first document's language picks a packaged base (stages/base_choice.py), once per state
    # folder; a packaged name or a local folder is used as given.
    base: str = "auto"
    reranker: str = ""
    teacher: str = "none"
    teacher_bm25_weight: float | None = Field(None, ge=0, le=1)
    query_instruction: str = ""
    device: str = "auto"
    encode_batch_size: int = Field(64, ge=1)
    # A batch's padded tokens at most (texts x the longest); 0: 2048 on a CPU (faster there), none on a GPU
    encode_batch_tokens: int = Field(0, ge=0)
    # Weights and activations when torch encodes: "auto" is fp16 on a GPU and fp32 on a CPU
    encode_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # What encodes on the CPU (training is always torch): "auto" uses a version's ONNX export once it is
    # made and matches torch (stages/backend_check.py), torch until then or when it does not; "onnx" uses
    # the export whatever the check found (status says what it found); "torch" never exports.
    backend: Literal["auto", "torch", "onnx"] = "auto"
    # "auto": int8 weights when they pass the same check, else fp32; "none": fp32 only; "int8": int8 only
    quantize: Literal["auto", "none", "int8"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"model.device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("teacher")
    @classmethod
    def _teacher_spec(cls, value: str) -> str:
        value = value.strip() or "none"
        if value == "none":
            return value
        for part in value.split("+"):
            name, star, weight = part.strip().rpartition("*")
            name = name.strip() if star else part.strip()
            if not name:
                raise ValueError(
                    "model.teacher has an empty member (use e.g. 'hybrid*0.5 + /models/reranker*0.5')"
                )
            if name == "llm":
                raise ValueError(
                    "model.teacher = 'llm' is not supported yet: use 'hybrid', a cross-encoder or "
                    "bi-encoder folder, or 'none'"
                )
            if star:
                try:
                    if float(weight) <= 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(
                        f"model.teacher weight {weight.strip()!r} must be a positive number"
                    ) from None
        return value


class TrainingSettings(_Section):
    min_new_samples: int = Field(200, ge=1)
    window: str = "always"
    check_minutes: float = Field(5.0, gt=0)
    init: Literal["base", "current"] = "base"
    epochs: float = Field(1.0, gt=0)
    max_pairs: int = Field(1000, ge=1)
    max_minutes: float = Field(20.0, gt=0)
    batch_size: int = Field(32, ge=2)
    cached_batch: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    learning_rate: float = Field(1e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.05, gt=0, le=1)
    hard_negatives: int = Field(3, ge=0, le=64)
    negative_range: tuple[int, int] = (2, 200)
    negative_margin: float = Field(0.05, ge=0)
    loss: str = "mnrl"
    label_repair: Literal["relabel", "drop", "none"] = "relabel"
    teacher_keep_rank: int = Field(3, ge=1, le=100)
    teacher_depth: int = Field(30, ge=2, le=1000)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    # "auto": frozen when the vocabulary has at least 100,000 tokens (stages/train.py FREEZE_VOCAB_MIN)
    freeze_word_embeddings: bool | Literal["auto"] = "auto"
    seed: int = 42
    launcher: Literal["local", "torchrun"] = "local"
    nproc_per_node: int = Field(1, ge=1, le=64)
    nnodes: int = Field(1, ge=1, le=1024)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str = ""

    @model_validator(mode="after")
    def _launcher_consistent(self) -> TrainingSettings:
        if self.launcher == "local" and (self.nproc_per_node > 1 or self.nnodes > 1):
            raise ValueError(
                "training.nproc_per_node / training.nnodes > 1 need training.launcher = 'torchrun'"
            )
        if self.node_rank >= self.nnodes:
            raise ValueError("training.node_rank must be smaller than training.nnodes")
        if self.nnodes > 1 and not self.rdzv_endpoint.strip():
            raise ValueError(
                "training.rdzv_endpoint (host:port of node 0) is needed when training.nnodes > 1"
            )
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ValueError("training.rdzv_endpoint must be host:port, e.g. '10.0.0.1:29400'")
        return self

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "distill" in data:
            raise ValueError(
                "training.distill was removed: teacher scores now reach training through training.loss "
                "(e.g. 'mnrl+margin_mse' or 'kl') and the teacher is model.teacher"
            )
        return data

    @field_validator("loss")
    @classmethod
    def _loss_spec(cls, value: str) -> str:
        from stages.losses import LossSpecError, parse_loss  # pure parsing, no torch

        try:
            parse_loss(value)
        except LossSpecError as exc:
            raise ValueError(f"training.loss: {exc}") from None
        return value.strip()

    @field_validator("freeze_word_embeddings", mode="before")
    @classmethod
    def _freeze_choice(cls, value: object) -> object:
        """Only TOML's true/false or "auto": a lax bool would read "no" or 1 as a choice."""
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f'training.freeze_word_embeddings {value!r}: use true, false or "auto"')

    @field_validator("negative_range")
    @classmethod
    def _range_order(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1 or high <= low:
            raise ValueError("training.negative_range must be [low, high] with 1 <= low < high")
        return value

    @field_validator("window")
    @classmethod
    def _window_is_cron(cls, value: str) -> str:
        value = value.strip()
        if value == "always":
            return value
        if len(value.split()) != 5:
            raise ValueError(
                "training.window must be 'always' or a 5-field cron expression "
                "(minute hour day month weekday), e.g. '0 2 * * *'"
            )
        from apscheduler.triggers.cron import CronTrigger  # light; only for a configured window

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"training.window is not a valid cron expression ({exc})") from exc
        return value


class PromotionSettings(_Section):
    metric: Literal["ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "mrr@10", "map@10"] = (
        "ndcg@10"
    )
    min_gain: float = Field(0.005, ge=0)
    merge_weights: list[float] = Field(default_factory=lambda: [0.5, 0.7])
    merge_with_data: bool = False
    guard_eval: str = ""
    max_guard_drop: float = Field(0.01, ge=0)
    human_tolerance: float = Field(0.0, ge=0)
    synthetic_only_min_gain: float = Field(0.01, ge=0)
    user_eval: str = ""
    user_eval_query_key: str = "anchor"
    user_eval_positive_key: str = "positive"
    on_promote: str = ""
    bootstrap_samples: int = Field(1000, ge=0)
    eval_pool: int = Field(10_000, ge=0)
    heldout_queries: int = Field(1000, ge=1)
    # The questions users asked (the judge part of the query log) are judged on once at least this many
    # of them are logged (docs/promotion.md, rule 0)
    asked_min_queries: int = Field(30, ge=2)
    # With event labels on at least ppi_min_gold of them, the gain's PPI++ interval must lie above this
    asked_min_gain: float = Field(0.0, ge=0)
    # (PPI++'s normal interval covers ~90% of the time with 30 gold questions, ~93% with 60: stages/ppi.py)
    ppi_min_gold: int = Field(50, ge=2)
    # With an assessor's grades alone, the interval's low end must reach this margin
    assessor_only_min_gain: float = Field(0.01, ge=0)
    # Who grades the pooled answers: "llm" (needs llm.url), "teacher" (model.teacher, or the hybrid of
    # the base model and BM25 when that is "none": a weak assessor), "auto": the LLM when there is one
    assessor: Literal["auto", "llm", "teacher"] = "auto"
    # Interleaved trials (docs/promotion.md, "Interleaved trials"): a candidate the gate could not tell
    # from the model in service is mixed, team-draft, into this share of `/v1/search` questions while
    # the application's events decide; 0 turns trials off. A trial opens only where events are posted.
    trial_share: float = Field(0.2, ge=0, le=1)
    trial_alpha: float = Field(0.05, gt=0, lt=0.5)
    trial_min_decided: int = Field(30, ge=1)
    trial_max_questions: int = Field(5000, ge=1)
    trial_max_days: float = Field(14.0, gt=0)
    # A trial's question counts once this long has passed since it was asked, with the events that came
    # within it (later ones are not counted): each outcome is then fixed when it enters the test
    trial_event_window_s: float = Field(900.0, ge=0)

    @field_validator("merge_weights")
    @classmethod
    def _weights_in_unit(cls, value: list[float]) -> list[float]:
        for weight in value:
            if not 0 < weight < 1:
                raise ValueError("promotion.merge_weights entries must be in (0, 1) (candidate's share)")
        return value


class IndexSettings(_Section):
    """The vector store that follows the model in service (Milvus; Milvus Lite in one file by default)."""

    enabled: bool = True
    uri: str = ""
    token_env: str = "EMBEDTUNE_MILVUS_TOKEN"
    alias: str = "embedtune_chunks"
    keep_collections: int = Field(1, ge=0, le=100)
    batch_size: int = Field(256, ge=1, le=100_000)
    index_type: str = "AUTOINDEX"
    lock_timeout_s: float = Field(120.0, gt=0)
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    analyzer: Literal["auto", "standard", "jieba"] = "auto"
    bm25_weight: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = "auto"
    candidates: int = Field(100, ge=10, le=5000)

    @field_validator("alias")
    @classmethod
    def _milvus_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", value):
            raise ValueError("index.alias must start with a letter or _ and hold only letters, digits and _")
        return value

    @field_validator("uri")
    @classmethod
    def _uri_form(cls, value: str) -> str:
        value = value.strip()
        if value and not (
            value.startswith(("http://", "https://", "tcp://", "unix:")) or value.endswith(".db")
        ):
            raise ValueError(
                "index.uri must be a Milvus server address (http://host:19530) or a Milvus Lite file "
                "ending in .db; empty means <state_dir>/index/milvus.db"
            )
        return value

    def lite_path(self, state_dir: Path) -> Path | None:
        """The Milvus Lite file, or None when a server is configured."""
        if not self.uri:
            return state_dir / "index" / "milvus.db"
        return Path(os.path.expanduser(self.uri)) if self.uri.endswith(".db") else None

    def token(self) -> str:
        return os.environ.get(self.token_env, "")


class MetricsSettings(_Section):
    """Prometheus metrics in node_exporter's textfile format (no socket of our own)."""

    textfile: str = ""
    interval_s: float = Field(15.0, ge=1)

    @field_validator("textfile")
    @classmethod
    def _prom_suffix(cls, value: str) -> str:
        if value and value.strip().lower() != "off" and not value.endswith(".prom"):
            raise ValueError(
                "metrics.textfile must end in .prom (node_exporter reads only those) or be 'off'"
            )
        return value

    def path(self, state_dir: Path) -> Path | None:
        if self.textfile.strip().lower() == "off":
            return None
        return Path(os.path.expanduser(self.textfile)) if self.textfile else state_dir / "metrics.prom"


class QueryLogSettings(_Section):
    """The log of what users ask and what their applications did with the answers (state/query_log.py):
    the gate on real questions reads it. It stays in the state database, on this machine."""

    # false: searches (CLI and HTTP) log nothing; what is already logged stays until retention removes it
    enabled: bool = True
    # Days a query and its events are kept (the daemon prunes at start and daily); 0 keeps them for ever
    retention_days: float = Field(90.0, ge=0)
    # Rounds train on the clicked (or cited) answers of the train part of the logged questions, before
    # the synthetic pairs (stages/real_queries.py); false: synthetic pairs only
    train_on_clicks: bool = True
    # The most recently asked distinct questions a round reads (train and judge parts together)
    questions: int = Field(2000, ge=0, le=1_000_000)
    # The share of new questions set apart, for good, for the gate alone (never trained on)
    judge_share: float = Field(0.5, gt=0, lt=1)


class ServeSettings(_Section):
    """`embedtune serve`: the HTTP API RAG applications call (daemon/serve.py)."""

    # Loopback by default: another address is refused at start unless the token variable is set
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    # The environment variable holding the bearer token clients must send (empty or unset: no token)
    token_env: str = "EMBEDTUNE_SERVE_TOKEN"
    # Largest request body; a longer one gets 413 before it is read
    max_body_bytes: int = Field(1_000_000, ge=1024, le=1_000_000_000)
    # Texts one /v1/embeddings request may carry, and queries one /v1/search request may carry
    max_inputs: int = Field(256, ge=1, le=100_000)
    max_queries: int = Field(64, ge=1, le=10_000)
    # Largest k /v1/search answers
    max_k: int = Field(100, ge=1, le=10_000)
    # A request's model work (waiting for the model included) longer than this gets 504
    request_timeout_s: float = Field(30.0, gt=0)
    # How often the served model is looked up (a promotion or rollback is followed within about this)
    poll_s: float = Field(1.0, gt=0, le=60)

    @field_validator("host")
    @classmethod
    def _host_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("serve.host must name an address (127.0.0.1 for this machine only)")
        return value.strip()

    @field_validator("token_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("serve.token_env must be an environment variable name (letters, digits, _)")
        return value

    def token(self) -> str:
        """The bearer token from the environment ("" when none is set); never from the file."""
        return os.environ.get(self.token_env, "").strip()


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    paths: PathsSettings = Field(default_factory=PathsSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    query_log: QueryLogSettings = Field(default_factory=QueryLogSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _teacher_for_loss(self) -> Settings:
        from stages.losses import needs_teacher

        if self.model.teacher == "none" and needs_teacher(self.training.loss):
            raise ValueError(
                f"training.loss = {self.training.loss!r} learns from teacher scores: set model.teacher "
                "(e.g. 'hybrid') or use training.loss = 'mnrl'"
            )
        return self

    def llm_api_key(self) -> str | None:
        """The bearer key, read from the environment variable the config names (never from the file)."""
        return os.environ.get(self.llm.api_key_env) or None


# What SIGHUP may change in a running daemon. Every key of these sections is read when it is used (the
# LLM client is rebuilt, the breaker's limits updated, each job and each new round reads its settings, each
# query-log prune its retention), so a change applies at once; logging.level is applied by reconfiguring
# the logger. Everything else (paths, ingest, model, logging.format) is fixed at start-up: a changed value
# is reported as needing a restart and the running value is kept, so what the daemon says it uses is what
# it uses.
LIVE_SECTIONS = ("llm", "synthesis", "training", "promotion", "query_log")
LIVE_EXTRA_KEYS = ("logging.level",)


def _dotted_items(settings: Settings) -> dict[str, object]:
    return {
        f"{section}.{key}": getattr(getattr(settings, section), key)
        for section, model in type(settings).model_fields.items()
        for key in model.annotation.model_fields
    }


def is_live(dotted: str) -> bool:
    return dotted.split(".")[0] in LIVE_SECTIONS or dotted in LIVE_EXTRA_KEYS


def changed_keys(old: Settings, new: Settings) -> dict[str, tuple[object, object]]:
    """Every key whose value differs, as {dotted key: (old, new)}."""
    before, after = _dotted_items(old), _dotted_items(new)
    return {key: (before[key], after[key]) for key in before if before[key] != after[key]}


def diff_live(old: Settings, new: Settings) -> dict[str, tuple[object, object]]:
    """The live-reloadable keys whose values differ, as {key: (old, new)}."""
    return {key: change for key, change in changed_keys(old, new).items() if is_live(key)}


def restart_keys(running: Settings, wanted: Settings) -> list[str]:
    """Keys changed in the file that only a restart applies (empty again once the file matches)."""
    return sorted(key for key in changed_keys(running, wanted) if not is_live(key))


def apply_live(running: Settings, wanted: Settings) -> dict[str, tuple[object, object]]:
    """Copy the changed live keys into the running settings object; returns what changed. All of them
    or none: the running settings with the new live values are validated as a whole first (keys that
    must agree, such as training.launcher and nproc_per_node, would fail one assignment at a time), and
    a ConfigError leaves the running settings as they were."""
    changes = diff_live(running, wanted)
    if not changes:
        return {}
    merged = running.model_dump()
    for dotted, (_old, new) in changes.items():
        section, key = dotted.split(".")
        merged[section][key] = new
    try:
        checked = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            _format_error(exc, "the reloaded file (live keys with the running settings)")
        ) from exc
    for dotted in changes:
        section, key = dotted.split(".")
        # in place, as validated together above: objects that hold a section see the new values
        getattr(running, section).__dict__[key] = getattr(getattr(checked, section), key)
    return changes


ENV_OVERRIDES = {
    "EMBEDTUNE_LLM_URL": ("llm", "url"),
    "EMBEDTUNE_LLM_MODEL": ("llm", "model"),
    "EMBEDTUNE_INBOX": ("paths", "inbox"),
    "EMBEDTUNE_STATE_DIR": ("paths", "state_dir"),
}


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The file to load: --config, else $EMBEDTUNE_CONFIG, else none (embedded defaults)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def load_settings(path: str | os.PathLike[str] | None = None, *, env: bool = True) -> Settings:
    """Read and validate a config file; with no file, the embedded defaults. Env overrides apply last."""
    data: dict = {}
    source = "embedded defaults"
    resolved = config_path(path)
    if resolved is not None:
        source = str(resolved)
        try:
            with open(resolved, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {resolved}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{resolved} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {resolved}: {exc}") from exc
        base_dir = resolved.resolve().parent
        _resolve_relative_paths(data, base_dir)
    if env:
        for variable, (section, key) in ENV_OVERRIDES.items():
            if variable in os.environ:
                data.setdefault(section, {})[key] = os.environ[variable]
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc


# Keys holding file or folder paths that a config file may give relative to itself.
RELATIVE_PATH_KEYS = (
    ("paths", "inbox"),
    ("paths", "state_dir"),
    ("promotion", "user_eval"),
    ("promotion", "guard_eval"),
    ("index", "uri"),
    ("metrics", "textfile"),
)
# Files that must exist when set; checked by `config check` and at daemon start, not by every load
# (`status` must answer even when an evaluation file went missing).
REQUIRED_FILE_KEYS = (("promotion", "user_eval"), ("promotion", "guard_eval"))


def _resolve_relative_paths(data: dict, base_dir: Path) -> None:
    """Relative paths in a config file are relative to that file, not to the working directory."""
    for section, key in RELATIVE_PATH_KEYS:
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        value = table.get(key)
        if not isinstance(value, str) or not value or value.lower() == "off" or ":" in value:
            continue  # empty, switched off, or an address (http://, unix:) rather than a path
        if not value.startswith(("~", "/", "$")):
            table[key] = str(base_dir / value)
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("base", "reranker"):
            if isinstance(model.get(key), str) and _is_relative_folder(model[key]):
                model[key] = str(base_dir / model[key])
        teacher = model.get("teacher")
        if isinstance(teacher, str):
            parts = teacher.split("+")
            resolved = [_resolve_member(part, base_dir) for part in parts]
            if resolved != [part.strip() for part in parts]:  # only a spec that named a relative folder
                model["teacher"] = " + ".join(resolved)


TEACHER_NAMES = ("none", "hybrid", "llm")
AUTO_BASE = AUTO  # one value for "auto" (stages/base_choice.py decides what it means)


def _is_relative_folder(value: str) -> bool:
    value = value.strip()
    return (
        bool(value)
        and not value.startswith(("~", "/", "$", PACKAGED_PREFIX))
        and value not in TEACHER_NAMES
        and value != AUTO_BASE
    )


def _resolve_member(part: str, base_dir: Path) -> str:
    """One member of a teacher spec ("name", or "name*weight") with a relative folder made absolute."""
    name, star, weight = part.strip().rpartition("*")
    name = name.strip() if star else part.strip()
    if _is_relative_folder(name):
        name = str(base_dir / name)
    return f"{name}*{weight.strip()}" if star else name


def model_folder_problems(settings: Settings) -> list[str]:
    """Model references that `run` could not load: a folder that is missing or holds no model, a packaged
    model whose package is not installed. One message per key."""
    import importlib.util

    from stages.models import PACKAGED

    problems = []
    references = [("model.base", settings.model.base), ("model.reranker", settings.model.reranker)]
    for part in settings.model.teacher.split("+"):
        name, star, _weight = part.strip().rpartition("*")
        references.append(("model.teacher", name.strip() if star else part.strip()))
    for key, value in references:
        if key == "model.base" and value == AUTO_BASE:  # auto may choose either packaged base
            missing = [name for name, module in PACKAGED.items() if importlib.util.find_spec(module) is None]
            if missing:
                problems.append(
                    f"model.base: auto needs the packaged models installed ({', '.join(missing)})"
                )
            continue
        if not value or value in TEACHER_NAMES:
            continue
        if value.startswith(PACKAGED_PREFIX):
            module = PACKAGED.get(value[len(PACKAGED_PREFIX) :].strip().lower())
            if module is None or importlib.util.find_spec(module) is None:
                problems.append(f"{key}: {value} is not installed (packaged: {', '.join(PACKAGED)})")
            continue
        folder = Path(os.path.expandvars(value)).expanduser()
        if not folder.is_dir():
            problems.append(f"{key}: model folder not found: {folder} (models are never downloaded)")
        elif not ((folder / "modules.json").exists() or (folder / "config.json").exists()):
            problems.append(f"{key}: {folder} holds no model (no modules.json or config.json)")
    return problems


def missing_files(settings: Settings) -> list[str]:
    """One message per configured file or model folder that does not exist, naming its key."""
    problems = model_folder_problems(settings)
    for section, key in REQUIRED_FILE_KEYS:
        value = getattr(getattr(settings, section), key)
        if value and not Path(os.path.expandvars(value)).expanduser().exists():
            problems.append(f"{section}.{key}: file not found: {value}")
    return problems
