"""Training on several devices or machines through torchrun (`training.launcher = "torchrun"`).

Nothing of our own is distributed: `torch.distributed.run` starts `training.nproc_per_node` copies of
daemon/train_worker.py on this machine (and, with `nnodes` > 1, joins the ranks on the other machines at
`rdzv_endpoint`); the sentence-transformers trainer runs DDP over them. This object has train_model's
signature, so the round's train step does not know how training was launched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.logs import get_logger
from daemon.settings import Settings
from daemon.train_worker import OUTCOME_FILE, read_progress, write_job

log = get_logger("embedtune.distributed")
# Beyond training.max_minutes: model loading, the rendezvous and saving. A launch that outlives both is
# killed (a rank waiting for a peer that never comes) and the round fails.
LAUNCH_SLACK_S = 15 * 60
POLL_S = 2.0


class DistributedTrainingFailed(RuntimeError):
    """torchrun exited non-zero or timed out; the message carries its log's tail."""


@dataclass(frozen=True)
class TorchrunTrainer:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> TorchrunTrainer:
        training = settings.training
        return cls(training.nproc_per_node, training.nnodes, training.node_rank, training.rdzv_endpoint)

    def command(self, job: Path) -> list[str]:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}"]
        if self.nnodes > 1:
            command += [
                f"--nnodes={self.nnodes}",
                f"--node_rank={self.node_rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={self.rdzv_endpoint}",
            ]
        else:
            command.append("--standalone")  # a local rendezvous on a free port
        return [*command, "-m", "daemon.train_worker", str(job)]

    def __call__(self, init_path: Path, output_dir: Path, examples: list[dict], params, progress=None):
        from stages.train import TrainOutcome

        folder = output_dir.parent
        job = write_job(folder, init_path, output_dir, examples, params)
        log_path = folder / "torchrun.log"
        (folder / OUTCOME_FILE).unlink(missing_ok=True)
        command = self.command(job)
        log.info("torchrun_started", command=" ".join(command))
        env = dict(
            os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", _threads(self.nproc_per_node))
        )
        deadline = time.monotonic() + params.max_minutes * 60 + LAUNCH_SLACK_S
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                while process.poll() is None:
                    if time.monotonic() > deadline:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                        raise DistributedTrainingFailed(
                            f"torchrun ran past {params.max_minutes:g} min + {LAUNCH_SLACK_S // 60} min: "
                            f"killed ({_tail(log_path)})"
                        )
                    state = read_progress(folder)
                    if progress and state:
                        progress(state["step"], state["total"], state["loss"])
                    time.sleep(POLL_S)
            except BaseException:
                if process.poll() is None:  # the round is being stopped: take the ranks with it
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()
                raise
        if process.returncode != 0:
            raise DistributedTrainingFailed(f"torchrun exited {process.returncode}: {_tail(log_path)}")
        outcome_path = folder / OUTCOME_FILE
        if not outcome_path.exists():
            raise DistributedTrainingFailed(f"torchrun finished but rank 0 wrote no {OUTCOME_FILE}")
        return TrainOutcome(**json.loads(outcome_path.read_text()))


def _threads(nproc: int) -> str:
    """CPU threads per rank: the cores shared out (torchrun's own default is 1)."""
    return str(max(1, (os.cpu_count() or 1) // nproc))


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_.]*(?:Error|Exception|Failed)[A-Za-z]*: .+)$")


def _tail(path: Path, lines: int = 4) -> str:
    """What went wrong, in one line for the round's reason: the last exception a rank raised (torchrun's
    own summary names only the failing rank), else the log's last lines."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    errors = [m.group(1) for line in text if (m := _EXCEPTION_LINE.match(line.strip()))]
    if errors:
        return errors[-1][-800:]
    useful = [line.strip() for line in text if line.strip() and not line.startswith("  ")]
    return " | ".join(useful[-lines:])[-800:]
