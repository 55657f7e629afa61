"""`embedtune eval`: a model from the registry scored on a user's file, with the gate's bootstrap interval."""

from __future__ import annotations

import json


def main(argv: list[str]) -> int:
    """The CLI's parsing and settings, then the command (not daemon.cli.main: it configures logging for
    the process, which would bind structlog to this test's captured, soon closed, stdout)."""
    from structlog.testing import capture_logs

    from daemon.cli import _load, _parser
    from daemon.evaluation import cmd_eval

    args = _parser().parse_args(argv)
    with capture_logs():  # progress log lines would otherwise go to stdout, beside the JSON
        return cmd_eval(_load(args), args.data, args.model, args.against, args.metric, args.json)


PAIRS = [
    ("river city", "The river flows through the city."),
    ("solar energy", "Solar power and energy from the sun."),
    ("database server", "A database server stores files in a folder."),
    ("music history", "Music and history of the city."),
    ("neural network model", "Machine learning models learn with neural networks."),
]


def _data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps({"anchor": q, "positive": p}) for q, p in PAIRS) + "\n")
    return path


def _config(tmp_path, settings) -> str:
    path = tmp_path / "config.json.toml"
    path.write_text(
        f'[paths]\nstate_dir = "{settings.paths.state_dir}"\ninbox = "{settings.paths.inbox}"\n'
        f'[model]\nbase = "{settings.model.base}"\ndevice = "cpu"\n'
    )
    return str(path)


def test_eval_before_any_promotion_answers_with_the_base_model(tmp_path, make_settings, capsys):
    config = _config(tmp_path, make_settings())
    assert main(["--config", config, "eval", "--data", str(_data(tmp_path)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 5 and list(report["models"]) == ["base"]
    assert "nothing promoted yet" in report["note"] and "gain" not in report
    assert 0.0 <= report["models"]["base"]["ndcg@10"] <= 1.0


def test_eval_of_a_promoted_version_against_the_base(tmp_path, make_settings, tiny_embedder, capsys):
    from state.db import Database
    from state.layout import StateLayout
    from state.registry import ModelRegistry
    from tests.tiny_models import build_tiny_embedder

    settings = make_settings()
    layout = StateLayout(settings.paths.state_dir).ensure()
    other = build_tiny_embedder(tmp_path / "other", seed=7)  # a different model, standing in for a round's
    registry = ModelRegistry(Database(layout.database).conn, layout)
    registry.promote(registry.register(other).id)
    config = _config(tmp_path, settings)
    assert main(["--config", config, "eval", "--data", str(_data(tmp_path)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["models"]) == {"v1", "base"}
    gain = report["gain"]
    assert gain["over"] == "base" and gain["ci95"][0] <= gain["value"] <= gain["ci95"][1]
    assert main(["--config", config, "eval", "--data", str(_data(tmp_path)), "--model", "v1"]) == 0
    assert "gain over base" in capsys.readouterr().out


def test_eval_errors_name_the_problem(tmp_path, make_settings, capsys):
    config = _config(tmp_path, make_settings())
    data = str(_data(tmp_path))
    assert main(["--config", config, "eval", "--data", data, "--model", "v99"]) == 2
    assert "unknown model version v99" in capsys.readouterr().err
    assert main(["--config", config, "eval", "--data", data, "--model", "latest"]) == 2
    assert "use base, current or a version" in capsys.readouterr().err
    assert main(["--config", config, "eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert main(["--config", config, "eval", "--data", str(bad)]) == 2
    assert "expected JSON with 'anchor'" in capsys.readouterr().err
