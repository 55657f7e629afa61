"""One training process of a distributed round: what `torch.distributed.run` starts on every rank.

The round process (daemon/round_process.py) writes the job (examples, parameters, paths) to the round's
folder and launches `python -m torch.distributed.run ... -m daemon.train_worker JOB`; each rank loads the
same examples, and the sentence-transformers trainer shards them (DistributedSampler) and runs DDP. Rank
0 alone writes the candidate and `train_outcome.json`. Any rank that fails makes torchrun exit non-zero,
and the round fails with the log's tail: the model in service is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

JOB_FILE = "train_job.json"
OUTCOME_FILE = "train_outcome.json"
PROGRESS_FILE = "train_progress.json"


def write_job(folder: Path, init_path: Path, output_dir: Path, examples: list[dict], params) -> Path:
    """The job every rank reads (on several machines the round folder must be on shared storage)."""
    examples_path = folder / "train_examples.jsonl"
    with open(examples_path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    job = {
        "init_path": str(init_path),
        "output_dir": str(output_dir),
        "examples": str(examples_path),
        "params": asdict(params),
    }
    path = folder / JOB_FILE
    path.write_text(json.dumps(job, indent=2))
    return path


def run_job(job_path: Path) -> int:
    from stages.train import TrainParams, train_model

    job = json.loads(Path(job_path).read_text())
    with open(job["examples"], encoding="utf-8") as handle:
        examples = [json.loads(line) for line in handle if line.strip()]
    params = TrainParams(**job["params"])
    output_dir = Path(job["output_dir"])
    rank = int(os.environ.get("RANK", "0"))
    progress_path = output_dir.parent / PROGRESS_FILE

    def progress(step: int, total: int, loss: float | None) -> None:
        """Rank 0's step, for the round process to show in `status` (replaced atomically)."""
        partial = progress_path.with_suffix(".tmp")
        partial.write_text(json.dumps({"step": step, "total": total, "loss": loss}))
        os.replace(partial, progress_path)

    outcome = train_model(
        Path(job["init_path"]), output_dir, examples, params, progress if rank == 0 else None
    )
    if rank == 0:
        (output_dir.parent / OUTCOME_FILE).write_text(json.dumps(asdict(outcome), indent=2))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Wait for every rank (rank 0 may still be saving), then tear the group down explicitly: a rank
    that exits with the group alive can abort in the communication thread's destructor (seen here as
    SIGABRT, 'terminate called without an active exception'), which torchrun reports as a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def read_progress(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of an embedtune training round (torchrun)")
    parser.add_argument("job", type=Path, help=f"the round folder's {JOB_FILE}")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return run_job(args.job)


if __name__ == "__main__":
    sys.exit(main())
