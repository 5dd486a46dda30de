"""Trials on a Dask cluster: (point, block of trials) per task, the figures of a sequential run."""

from __future__ import annotations

import hashlib
import uuid

from ..cluster import (
    LOST_TASK_RETRIES,
    SharedData,
    is_lost_task,
    worker_cached,
    worker_count,
)
from .engine import Campaign, CampaignRecipe
from .options import TrialResult
from .parallel import TrialExecutor, aligned_spans


class DaskTrials(TrialExecutor):
    """Trials as Dask tasks: (point, block of trials) per task, the recipe sent once. A block
    whose worker was lost is submitted again (cluster.is_lost_task): trials are re-derivable,
    so the figures do not change."""

    def __init__(self, client, campaign: "Campaign"):
        self.client = client
        self.parallelism = worker_count(client)
        self.token = hashlib.sha256(campaign.model.SerializeToString() + repr((campaign.seed, [p.label for p in campaign.points])).encode()).hexdigest()
        self.recipe = SharedData(client, campaign.recipe())
        self.run_id = uuid.uuid4().hex[:12]  # task keys unique to this run

    def _submit(self, point: int, a: int, b: int, planned: int, attempt: int):
        return self.client.submit(_trial_block, self.recipe.refresh(), self.token, point, a, b, planned, pure=False, retries=2,
                                  key=f"harden-trials-{self.run_id}-{point}-{a}-{b}-{attempt}")

    def run(self, campaign: "Campaign", point: int, start: int, stop: int, planned: int) -> list[TrialResult]:
        spans = aligned_spans(start, stop, 2 * self.parallelism, campaign.stack_of(point, planned))
        futs = [self._submit(point, a, b, planned, 0) for a, b in spans]
        rows: list[TrialResult] = []
        for (a, b), fut in zip(spans, futs):
            for attempt in range(1, LOST_TASK_RETRIES + 2):
                try:
                    rows += fut.result()
                    break
                except Exception as exc:
                    if not is_lost_task(exc) or attempt > LOST_TASK_RETRIES:
                        raise
                    fut = self._submit(point, a, b, planned, attempt)
        return rows


def _trial_block(recipe: CampaignRecipe, token: str, point: int, start: int, stop: int, planned: int) -> list[TrialResult]:
    """A Dask task: trials [start, stop) of `point` on this worker's copy of the campaign."""
    campaign = worker_cached(token, recipe.build)
    return campaign.run_trials(point, start, stop, planned)


