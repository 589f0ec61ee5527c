"""Joining a multi-process job (``jax.distributed``): flags checked before any work, one clear line on failure.

A job is M processes started with the same command line plus ``--coordinator HOST:PORT --num-processes M
--process-id I`` (or none of them where ``jax.distributed.initialize`` detects SLURM or Open MPI by itself).
Process 0 hosts the coordinator. On CPU the collectives go through gloo. ``timeout_s`` bounds both the wait for
the other processes at start and the heartbeat after which the runtime declares a silent process dead.
"""
from __future__ import annotations

import dataclasses
import os
import re

# environment variables through which jax.distributed.initialize detects a job by itself
DETECTED_ENV = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}
DEFAULT_TIMEOUT_S = 60


class JobError(ValueError):
    """Bad job flags or a job that could not be joined; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """``coordinator``: "HOST:PORT" of process 0; ``num_processes`` M; ``process_id`` in 0..M-1. All None:
    one process, unless a SLURM or Open MPI launch is detected (``detected``)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    @property
    def detected(self) -> str | None:
        """The launcher jax.distributed would detect (multi-task only), or None."""
        for var, name in DETECTED_ENV.items():
            if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
                return name
        return None

    @property
    def multi_process(self) -> bool:
        return (self.explicit and self.num_processes != 1) or (not self.explicit and self.detected is not None)


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def check_job(spec: JobSpec) -> None:
    """Raise JobError for inconsistent flags; touches no JAX state (call it before anything else)."""
    if not spec.explicit:
        return
    missing = [flag for flag, v in (("--coordinator", spec.coordinator), ("--num-processes", spec.num_processes),
                                    ("--process-id", spec.process_id)) if v is None]
    if missing and spec.num_processes != 1:
        raise JobError(f"a multi-process job needs --coordinator HOST:PORT, --num-processes M and --process-id I "
                       f"together; missing {', '.join(missing)}")
    m = spec.num_processes
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise JobError(f"--num-processes must be a positive integer, got {m}")
    i = spec.process_id
    if i is not None and m is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < m):
        raise JobError(f"--process-id {i} is out of range for --num-processes {m}: use 0..{m - 1}")
    if spec.coordinator is not None:
        match = _ADDRESS.match(spec.coordinator)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise JobError(f"--coordinator {spec.coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:29500; process 0 "
                           "listens on that port)")
    if isinstance(spec.timeout_s, bool) or not isinstance(spec.timeout_s, int) or spec.timeout_s < 1:
        raise JobError(f"--job-timeout must be a positive number of seconds, got {spec.timeout_s}")


def start_job(spec: JobSpec) -> bool:
    """Join the job (before any other JAX call); returns whether this is a multi-process job. One process
    (no flags, nothing detected, or --num-processes 1) does nothing."""
    check_job(spec)
    if not spec.multi_process:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id, initialization_timeout=spec.timeout_s,
                                   heartbeat_timeout_seconds=spec.timeout_s)
    except (RuntimeError, ValueError) as e:  # jax raises XlaRuntimeError (a RuntimeError) on a failed connect
        where = spec.coordinator or spec.detected
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"process {spec.process_id} could not join the job at {where} within {spec.timeout_s} s "
                       f"({first[:200]}); check that process 0 runs with the same --num-processes and that the "
                       "address is reachable") from None
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main() -> bool:
    """True in process 0 (the one that prints, writes --json and --out), and in a one-process run."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a one-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
