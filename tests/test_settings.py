from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.settings import ConfigError, Settings, diff_live, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_valid_and_matches_embedded_defaults():
    from_file = load_settings(ROOT / "config.toml", env=False)
    embedded = Settings()
    assert from_file.model_dump() == embedded.model_dump()
    assert from_file.model.base == "auto"
    assert from_file.llm.enabled is False


def test_every_documented_key_exists():
    settings = Settings()
    for dotted in [
        "paths.inbox",
        "paths.state_dir",
        "ingest.settle_seconds",
        "ingest.max_file_mb",
        "llm.url",
        "llm.model",
        "llm.api_key_env",
        "llm.concurrency",
        "llm.timeout_s",
        "synthesis.questions_per_chunk",
        "synthesis.rewrites_per_question",
        "synthesis.judge_threshold",
        "synthesis.featured_percentage",
        "synthesis.heldout_fraction",
        "model.base",
        "model.reranker",
        "model.query_instruction",
        "training.min_new_samples",
        "training.window",
        "promotion.metric",
        "promotion.min_gain",
        "promotion.on_promote",
    ]:
        section, key = dotted.split(".")
        assert hasattr(getattr(settings, section), key), dotted


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[synthesis]\nfeatured_percentage = 0\n", "synthesis.featured_percentage"),
        ("[synthesis]\nfeatured_percentage = 1.5\n", "synthesis.featured_percentage"),
        ("[promotion]\nmin_gain = -0.1\n", "promotion.min_gain"),
        ('[llm]\nconcurrency = "many"\n', "llm.concurrency"),
        ('[llm]\nendpoint = "x"\n', "llm.endpoint"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ('[training]\nwindow = "every night"\n', "training.window"),
        ('[training]\nwindow = "61 * * * *"\n', "training.window"),
        ('[training]\nwindow = "* * *"\n', "training.window"),
        ('[training]\nwindow = "0 25 * * *"\n', "training.window"),
        ("[training]\nnegative_range = [10, 5]\n", "training.negative_range"),
        ("[training]\ncached_batch = -2\n", "training.cached_batch"),
        ('[training]\ncached_batch = "big"\n', "training.cached_batch"),
        ("[promotion]\nheldout_queries = 0\n", "promotion.heldout_queries"),
        ("[ingest]\nchunk_tokens = 64\nchunk_overlap = 64\n", "ingest"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, env=False)
    assert key in str(error.value)


def test_broken_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[llm\nurl=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "conf" / "c.toml"
    path.parent.mkdir()
    path.write_text('[paths]\ninbox = "in"\nstate_dir = "st"\n')
    settings = load_settings(path, env=False)
    assert settings.paths.inbox == tmp_path / "conf" / "in"


def test_relative_eval_files_resolve_against_the_config_file_and_must_exist(tmp_path, monkeypatch, capsys):
    from daemon.cli import main

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "eval.jsonl").write_text('{"anchor": "q", "positive": "p"}\n')
    path = folder / "c.toml"
    path.write_text('[promotion]\nuser_eval = "eval.jsonl"\nguard_eval = "guard.jsonl"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    settings = load_settings(path, env=False)
    assert settings.promotion.user_eval == str(folder / "eval.jsonl")
    assert settings.promotion.guard_eval == str(folder / "guard.jsonl")
    assert main(["--config", str(path), "config", "check"]) == 2
    error = capsys.readouterr().err
    assert "promotion.guard_eval: file not found" in error and "user_eval" not in error
    (folder / "guard.jsonl").write_text('{"anchor": "q", "positive": "p"}\n')
    assert main(["--config", str(path), "config", "check"]) == 0


def test_environment_overrides_and_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_LLM_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MY_KEY", "sekret")
    path = tmp_path / "c.toml"
    path.write_text('[llm]\napi_key_env = "MY_KEY"\n')
    settings = load_settings(path)
    assert settings.llm.url == "http://127.0.0.1:9/v1"
    assert settings.llm_api_key() == "sekret"
    assert "sekret" not in settings.model_dump_json()


def test_config_env_variable_selects_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nmin_new_samples = 7\n")
    monkeypatch.setenv("EMBEDTUNE_CONFIG", str(path))
    assert load_settings().training.min_new_samples == 7


def test_diff_live_lists_changed_reloadable_keys():
    old, new = Settings(), Settings()
    new.llm.concurrency = 3
    new.synthesis.judge_threshold = 0.9
    new.paths.inbox = Path("/elsewhere")  # not live: ignored by the diff
    new.logging.format = "json"
    assert set(diff_live(old, new)) == {"llm.concurrency", "synthesis.judge_threshold"}


def test_reload_applies_live_keys_only_and_names_the_rest():
    from daemon.settings import apply_live, restart_keys

    running, wanted = Settings(), Settings()
    wanted.llm.concurrency = 3
    wanted.ingest.workers = 5
    wanted.model.device = "cpu"
    wanted.logging.level = "debug"
    changes = apply_live(running, wanted)
    assert set(changes) == {"llm.concurrency", "logging.level"}
    assert running.llm.concurrency == 3 and running.ingest.workers == 2 and running.model.device == "auto"
    assert restart_keys(running, wanted) == ["ingest.workers", "model.device"]
    wanted.ingest.workers = 2  # changed back in the file: no restart needed for it any more
    assert restart_keys(running, wanted) == ["model.device"]


@pytest.mark.parametrize(
    "training",
    [
        {"launcher": "torchrun", "nproc_per_node": 2},  # launcher first would be fine, nproc first not
        {"launcher": "torchrun", "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "10.0.0.1:29400"},
    ],
)
def test_reload_applies_linked_training_keys_together(training):
    from daemon.settings import apply_live

    running = Settings()
    wanted = Settings.model_validate({"training": training})
    changes = apply_live(running, wanted)
    assert set(changes) == {f"training.{key}" for key in training}
    for key, value in training.items():
        assert getattr(running.training, key) == value
    back = apply_live(running, Settings())  # and back to the defaults, in the opposite order
    assert set(back) == set(changes) and running.training.launcher == "local"


def test_a_reload_that_cannot_apply_changes_nothing():
    from daemon.settings import ConfigError, apply_live

    # the file turns the teacher on (model.*: restart only) and a teacher loss with it (training.*: live);
    # until a restart the running teacher is "none", so the new loss cannot apply, and neither may epochs
    running = Settings()
    wanted = Settings.model_validate(
        {"model": {"teacher": "hybrid"}, "training": {"loss": "margin_mse", "epochs": 3.0}}
    )
    with pytest.raises(ConfigError, match="teacher"):
        apply_live(running, wanted)
    assert running.training.loss == "mnrl" and running.training.epochs == Settings().training.epochs


def test_cli_config_check(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(ROOT / "config.toml"), "config", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[promotion]\nmin_gain = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(bad), "config", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "promotion.min_gain" in result.stderr


def test_cached_batch_auto_bounds_cpu_memory_and_stays_off_on_a_gpu():
    from stages.train import CPU_CACHED_BATCH, resolve_cached_batch

    assert Settings().training.cached_batch == "auto"
    assert resolve_cached_batch("auto", on_cpu=True) == CPU_CACHED_BATCH
    assert resolve_cached_batch("auto", on_cpu=False) == 0
    assert resolve_cached_batch(0, on_cpu=True) == 0 and resolve_cached_batch(16, on_cpu=False) == 16


def test_config_check_refuses_what_run_cannot_start(tmp_path, tiny_embedder):
    """Model folders are checked, relative ones are found next to the config file, and a device torch
    does not know is refused by name."""
    import shutil

    shutil.copytree(tiny_embedder, tmp_path / "models" / "base")
    (tmp_path / "empty").mkdir()
    good = tmp_path / "good.toml"
    good.write_text('[model]\nbase = "models/base"\nteacher = "hybrid*0.5 + models/base*0.5"\n')
    elsewhere = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", str(good), "config", "check"],
        capture_output=True,
        text=True,
        cwd=tmp_path / "empty",  # relative to the file, not to where the command runs
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    effective = json.loads(elsewhere.stdout.split("\n", 1)[1])["model"]
    assert effective["base"] == str(tmp_path / "models" / "base")
    assert effective["teacher"] == f"hybrid*0.5 + {tmp_path / 'models' / 'base'}*0.5"
    for body, expected in (
        ('[model]\nbase = "models/missing"\n', "model.base: model folder not found"),
        ('[model]\nbase = "empty"\n', "model.base: " + str(tmp_path / "empty") + " holds no model"),
        ('[model]\nreranker = "/nowhere/bge-reranker"\n', "model.reranker: model folder not found"),
        ('[model]\nteacher = "hybrid + models/nope"\n', "model.teacher: model folder not found"),
        ('[model]\ndevice = "gpu"\n', "model.device"),
    ):
        config = tmp_path / "bad.toml"
        config.write_text(body)
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--config", str(config), "config", "check"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 2 and expected in done.stderr, (body, done.stderr)
        assert "Traceback" not in done.stderr
