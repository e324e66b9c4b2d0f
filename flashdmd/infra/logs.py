"""Logging of a job process: INFO lines of rank 0 reach the terminal or the job log, one format.

Every entry point calls ``setup_logging(rank)`` (the trainer once it knows its rank; jobs started
through jobs/submit.py in the job process before anything else), so "resuming run ...", the
progress lines and warnings land in the task's stderr, which is the terminal for a plain
``python -m flashdmd.train`` and the job log under Slurm or submitit's local executor. Other
ranks log warnings and errors only, prefixed with their rank: their INFO would repeat rank 0's.

A handler already on the root logger (pytest's, an application's) is kept; only the level of
the ``flashdmd`` loggers is set.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
_MARK = "_flashdmd_handler"


def setup_logging(rank: int = 0) -> None:
    """INFO and above of rank 0 (WARNING and above of the others) to stderr; idempotent."""
    root = logging.getLogger()
    mine = [h for h in root.handlers if getattr(h, _MARK, False)]
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(prefix + FORMAT, DATE_FORMAT)
    if mine:
        for handler in mine:
            handler.setFormatter(formatter)
    elif not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    logging.getLogger("flashdmd").setLevel(logging.INFO if rank == 0 else logging.WARNING)
