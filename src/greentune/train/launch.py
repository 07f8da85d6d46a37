"""`greentune train --nproc N`: the same command under torchrun on this machine, and how a
rank of such a job ends.

The CLI only parses; starting the job's processes and the ways a rank's process must end
(a lost peer in one line, a non-main rank without interpreter finalisation) live here.
"""

from __future__ import annotations

import logging
import os
import sys

from greentune.errors import UserError


def wanted(nproc: int | None) -> bool:
    """True when this process must start the job (and is not already one of its ranks)."""
    return bool(nproc and nproc > 1 and "WORLD_SIZE" not in os.environ)


def launch(argv: list[str], nproc: int) -> int:
    """`greentune train --nproc N ...`: the same command under torchrun on this machine.

    A worker that fails ends the job (torchrun stops the others); we report which rank in
    one line instead of torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"greentune-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:  # share the cores out instead of torchrun's default of 1 thread
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "greentune", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise UserError(
            f"rank {rank} of {nproc} failed ({how}); the other ranks were stopped. "
            "Fix the cause and continue with --resume"
        ) from None
    return 0


def run_rank(fn):
    """`fn()` (the training) as one rank of a job, or as the single process: returns its
    result, or exit code 1 after one line when another rank died mid-collective (torchrun
    names that rank). A rank other than 0 ends its process here once `fn` returns."""
    try:
        result = fn()
    except RuntimeError as err:  # another rank died: say so in one line, torchrun names the rank
        if "WORLD_SIZE" in os.environ and "closed by peer" in str(err):
            print(
                f"greentune: rank {os.environ.get('RANK')}: lost the connection to another rank, which "
                "stopped; stopping too",
                file=sys.stderr,
            )
            return 1
        raise
    if int(os.environ.get("RANK", "0")) != 0:
        # Rank 0 reports for the job. The others have left the process group and written
        # nothing; they end here without interpreter finalisation, where gloo's worker threads
        # can still hold work and abort the process (seen once in CI: "terminate called without
        # an active exception", SIGABRT after a finished run; pytorch/pytorch#179291).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return result
