"""Dask distributed as harden's engine beyond one machine (optional extra `distributed`).

`--cluster local` starts a LocalCluster on this machine (one single-threaded worker process per
core, loopback only); `--cluster tcp://host:8786` uses a running scheduler, which reaches Slurm,
LSF or PBS farms through dask-jobqueue (docs/distributed.md). `HARDEN_CLUSTER` gives the
address when the flag is absent. Without either, harden runs on its local process pool and
needs no Dask at all.

Why Dask rather than a home-made pool: it already does what a fleet of thousands of chips
needs: sending shared data to every worker once, retrying the tasks of a worker that dies,
running on the schedulers of compute farms.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Iterator

from .errors import InputError
from .runtime import set_session_threads

ENV = "HARDEN_CLUSTER"
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?$")


def cluster_address(address: str | None) -> str | None:
    """The address to use: the flag, else $HARDEN_CLUSTER, else None (no Dask)."""
    address = address if address is not None else os.environ.get(ENV)
    if address is None or not address.strip():
        return None
    address = address.strip()
    if address != "local" and not _ADDRESS.match(address):
        raise InputError(f"--cluster {address!r}: give 'local' or a scheduler address such as tcp://host:8786")
    return address


def require_distributed() -> None:
    """Exit 2 with the install hint when the extra is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError("--cluster needs Dask distributed: pip install 'harden[distributed]'") from None


@contextlib.contextmanager
def connect(address: str) -> Iterator[Any]:
    """A `distributed.Client` for `address` ('local' starts and stops a LocalCluster)."""
    require_distributed()
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if address == "local":
            cluster = LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            client = Client(address, timeout="15s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise InputError(f"--cluster {address}: cannot reach the Dask scheduler ({type(exc).__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_count(client: Any) -> int:
    """Threads across the scheduler's workers now (at least 1): how many tasks run at once."""
    return max(1, sum(client.nthreads().values()))


#: Objects a worker builds once per run (sessions, campaigns), keyed by the run's token.
_WORKER_CACHE: dict[str, Any] = {}


def worker_cached(token: str, build) -> Any:
    """`build()` once per worker process and token; later tasks of the same run reuse it."""
    if token not in _WORKER_CACHE:
        if len(_WORKER_CACHE) > 4:  # a long-lived worker serving several runs keeps only recent ones
            _WORKER_CACHE.pop(next(iter(_WORKER_CACHE)))
        set_session_threads(1)  # one onnxruntime thread per single-threaded Dask worker
        _WORKER_CACHE[token] = build()
    return _WORKER_CACHE[token]


#: How often a task whose worker was lost is submitted again before the run gives up.
LOST_TASK_RETRIES = 3


def is_lost_task(exc: BaseException) -> bool:
    """Whether a task failed because of the cluster (its worker died, its inputs were lost
    with it, the scheduler dropped it), not because of the work: such a task is run again."""
    from concurrent.futures import CancelledError

    try:
        from distributed import KilledWorker
        from distributed.client import FutureCancelledError
    except ImportError:  # an older distributed
        from distributed.scheduler import KilledWorker

        FutureCancelledError = CancelledError
    return isinstance(exc, (KilledWorker, FutureCancelledError, CancelledError))


class SharedData:
    """Data sent to every worker once (`client.scatter(broadcast=True)`), sent again if the
    cluster loses every copy (all the workers that held it died)."""

    def __init__(self, client: Any, value: Any):
        self.client, self.value = client, value
        self.future = client.scatter(value, broadcast=True, hash=False)

    def refresh(self) -> Any:
        if self.future.status != "finished":
            self.future = self.client.scatter(self.value, broadcast=True, hash=False)
        return self.future
