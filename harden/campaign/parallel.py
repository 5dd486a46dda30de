"""How a campaign's trials are shared out: the executor protocol, and this process's threads.

`TrialExecutor` runs blocks of a point's trials somewhere else (threads here, Dask workers in
executors.py); every trial is re-derived from (seed, point, trial) and runs in the group its
index and the point's trial count fix (Campaign.run_trials), so any executor gives the figures
of a sequential run."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..runtime import process_session_threads, set_thread_session_threads
from .options import CampaignOptions, TrialResult


class Campaign(Protocol):
    """What an executor asks of a campaign (engine.Campaign, which imports this module)."""

    def stack_of(self, point: int, planned: int | None = None) -> int: ...

    def fed(self, point: int) -> bool: ...

    def run_trials(self, point: int, start: int, stop: int, planned: int | None = None) -> list[TrialResult]: ...


class TrialExecutor:
    """Runs blocks of trials somewhere else; `run` returns them in trial order (a list, or an
    iterator that the caller closes when it stops early)."""

    def round_end(self, start: int, planned: int, options: CampaignOptions, width: int = 1) -> int:
        """Where the next round stops: all planned trials without a margin, else a few
        stopping checkpoints' worth, so that early stopping wastes at most one round: two
        trials per worker, or one group of `width` trials (a stacked pass) per worker, ending
        at a group's end (a group split between rounds would be run twice)."""
        if options.margin is None:
            return planned
        step = options.check_every
        size = max(self.parallelism * max(2, width), options.min_trials - start, step)
        end = start + -(-size // step) * step
        return min(planned, -(-end // width) * width)

    parallelism: int = 1

    def run(self, campaign: "Campaign", point: int, start: int, stop: int, planned: int) -> Iterable[TrialResult]:
        """Trials [start, stop) of the point's `planned` (`Campaign.run_trials` groups by it)."""
        raise NotImplementedError


def aligned_spans(start: int, stop: int, blocks: int, stack: int) -> list[tuple[int, int]]:
    """[start, stop) in at most `blocks` spans of about equal size whose inner edges are
    multiples of `stack` (a stacked pass's group is never split between two workers)."""
    groups = -(-stop // stack) - start // stack
    blocks = max(1, min(blocks, groups))
    edges = (np.linspace(start // stack, start // stack + groups, blocks + 1).round().astype(int) * stack).tolist()
    edges[0], edges[-1] = start, stop
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def default_jobs() -> int:
    """The cores this process may run on, or the onnxruntime threads it was limited to (a Dask
    worker: 1)."""
    limit = process_session_threads()
    if limit:
        return limit
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ThreadTrials(TrialExecutor):
    """A point's stacked groups (stacking.py) on `jobs` threads of this process, each group on a
    session of one onnxruntime thread: one pass per core rather than each pass split over the
    cores. Measured on the zoo's MobileNetV2 (2 cores, 100 stuck-at trials, bench_campaign.py):
    onnxruntime splits a pass over small batches poorly (a clean pass 7.9 ms on one thread,
    6.7 ms on two), and while one thread draws faults or builds a session the other runs a pass.
    Threads rather than processes: nothing to start or copy (the model, the data and the layouts
    stay shared); onnxruntime and numpy's sorts release the GIL. A point whose trials are fed to
    an unstackable graph (transformers, `Campaign.fed`) runs one trial per thread, each thread on
    a session of its own (the ViT: two one-thread sessions side by side 5-7 ms per pass, one
    two-thread session 11-21 ms); a point whose trials each build a session (conv-bound models too
    big to stack: ResNet-50) runs on the calling thread, its passes on every core, one session's
    memory at a time. Figures do not change: a trial's group and slot are fixed by the trial
    index and the point's trial count (Campaign.run_trials), whichever thread runs it."""

    def __init__(self, jobs: int | None = None):
        if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise InputError(f"jobs must be an integer >= 1, got {jobs!r}")
        self.parallelism = jobs or default_jobs()
        self._pool = futures.ThreadPoolExecutor(self.parallelism, thread_name_prefix="harden-trials",
                                                initializer=set_thread_session_threads, initargs=(1,))

    def run(self, campaign: "Campaign", point: int, start: int, stop: int, planned: int) -> Iterator[TrialResult]:
        """Trials [start, stop) in order, yielded group by group as they finish (in order); a
        caller that stops early closes the generator, which cancels the groups not started and
        waits for the running ones."""
        width = campaign.stack_of(point, planned)  # builds the point's session here, not in the threads
        groups = aligned_spans(start, stop, stop - start, width)  # one span per group (or trial)
        if self.parallelism < 2 or len(groups) < 2 or (width < 2 and not campaign.fed(point)):
            yield from campaign.run_trials(point, start, stop, planned)  # one group, or a session built per trial
            return
        jobs = [self._pool.submit(campaign.run_trials, point, a, b, planned) for a, b in groups]
        try:
            for job in jobs:
                yield from job.result()
        finally:
            for job in jobs:
                job.cancel()
            futures.wait(jobs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ThreadTrials":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
