"""A real two-process training round on CPU through torchrun (gloo), on the tiny model."""

from __future__ import annotations

import json

import pytest

WORDS = "river city music history solar energy water database server network model search".split()


def _examples(count: int = 32) -> list[dict]:
    rows = []
    for i in range(count):
        a, b, c = WORDS[i % 12], WORDS[(i + 5) % 12], WORDS[(i + 7) % 12]
        rows.append(
            {
                "query": f"{a} {b} {i}",
                "pos": f"the {a} and the {b} in part {i} of the guide",
                "neg": [f"a {c} file in folder {i}"],
                "scores": [0.9, 0.1],
            }
        )
    return rows


def _params(**extra):
    from stages.train import TrainParams

    return TrainParams(batch_size=4, learning_rate=3e-4, device="cpu", precision="fp32", **extra)


def test_two_ranks_train_on_different_shards_and_rank_zero_saves(tmp_path, tiny_embedder):
    from sentence_transformers import SentenceTransformer

    from daemon.distributed import TorchrunTrainer
    from stages.train import shard_log_dir

    output = tmp_path / "round" / "candidate"
    output.parent.mkdir()
    seen: list[tuple[int, int]] = []
    outcome = TorchrunTrainer(nproc_per_node=2)(
        tiny_embedder, output, _examples(), _params(), lambda step, total, loss: seen.append((step, total))
    )
    assert outcome.steps >= 2 and outcome.final_loss is not None
    shards = [json.loads((shard_log_dir(output) / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(shard["rows"] > 0 for shard in shards)
    assert not set(shards[0]["anchors"]) & set(shards[1]["anchors"])  # each rank its own rows
    assert len(set(shards[0]["anchors"]) | set(shards[1]["anchors"])) >= 16
    model = SentenceTransformer(str(output), device="cpu")  # the one candidate, written by rank 0
    assert model.encode(["river city"]).shape == (1, 32)
    assert (output.parent / "torchrun.log").exists() and (output.parent / "train_job.json").exists()


def test_a_failing_rank_fails_the_launch_with_its_reason(tmp_path, tiny_embedder):
    from daemon.distributed import DistributedTrainingFailed, TorchrunTrainer

    output = tmp_path / "round" / "candidate"
    output.parent.mkdir()
    rows = [{k: v for k, v in row.items() if k != "scores"} for row in _examples()]
    with pytest.raises(DistributedTrainingFailed, match="needs teacher scores"):
        TorchrunTrainer(nproc_per_node=2)(tiny_embedder, output, rows, _params(loss="margin_mse"))
    assert not output.exists()


def test_launcher_settings_are_checked():
    from daemon.settings import Settings

    def error(**training) -> str:
        with pytest.raises(ValueError) as caught:
            Settings.model_validate({"training": training})
        return str(caught.value)

    assert "training.launcher" in error(nproc_per_node=2)
    assert "rdzv_endpoint" in error(launcher="torchrun", nnodes=2)
    assert "node_rank" in error(launcher="torchrun", nnodes=2, node_rank=2, rdzv_endpoint="h:1")
    assert "host:port" in error(launcher="torchrun", rdzv_endpoint="node0")
    ok = Settings.model_validate({"training": {"launcher": "torchrun", "nproc_per_node": 2}})
    from daemon.distributed import TorchrunTrainer

    command = TorchrunTrainer.from_settings(ok).command(__import__("pathlib").Path("/r/train_job.json"))
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"] and "--standalone" in command
    multi = TorchrunTrainer(4, 2, 1, "10.0.0.1:29400").command(__import__("pathlib").Path("/r/j.json"))
    assert "--rdzv_endpoint=10.0.0.1:29400" in multi and "--node_rank=1" in multi


def test_a_whole_round_trains_on_two_ranks(make_settings):
    from sentence_transformers import SentenceTransformer

    from stages.train import shard_log_dir
    from tests.test_rounds import _round_settings, foreground_round

    # One epoch: each epoch reshuffles, so shards are disjoint within an epoch, not across epochs.
    settings = _round_settings(
        make_settings,
        min_new_samples=10_000,
        launcher="torchrun",
        nproc_per_node=2,
        epochs=1.0,
        hard_negatives=1,
    )
    _running, row, folder = foreground_round(settings)
    assert row["state"] == "finished", row["error"]
    shards = [json.loads((shard_log_dir(folder / "candidate") / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Both ranks trained, on different rows (this corpus repeats sentence templates, so texts may recur;
    # strict disjointness is checked above on distinct rows).
    assert all(s["rows"] for s in shards) and shards[0]["anchors"] != shards[1]["anchors"]
    assert json.loads((folder / "train_outcome.json").read_text())["steps"] > 0
    assert SentenceTransformer(str(folder / "candidate"), device="cpu").encode(["river"]).shape == (1, 32)
