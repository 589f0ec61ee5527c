"""lm-evaluation-harness (0.4) model ``resq-jax``: zero- and few-shot tasks scored by our jitted models.

    lm_eval --model resq-jax --model_args model=smollm2,method=resq,calib_windows=64 --tasks ...
    scripts/evaluate.py --tasks cloze-wiki [--checkpoint DIR | --model M] [--limit N] [--num-fewshot K]

The model is the float model, any recipe of quantize.py quantized on the fly (``method=``, plus ``calib_windows``,
``calib_seq_len``, ``seed`` and the recipe's settings by their QuantConfig names, e.g. ``cayley_steps=100``), or a
packed checkpoint (``checkpoint=DIR``). Quantized models run the packed runtime's integer arithmetic when it can
represent them, as quantize.py's table does.

Requests become (inputs, targets) token pairs scored by ``eval.scoring.Scorer`` in padded batches:
``loglikelihood`` tokenizes as lm-eval's HF backend does (TemplateLM: the context's trailing spaces move to the
continuation, an empty context is the end-of-text token), keeps the last ``max_length`` tokens, and sums the
continuation's log-probabilities; ``loglikelihood_rolling`` scores a whole text in lm-eval's disjoint rolling
windows of ``max_length`` tokens; ``generate_until`` continues greedily with the KV cache (float, or the packed
runtime's quantized cache) in left-padded batches and cuts at the first stop string.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from resq_jax.eval import local_tasks
from resq_jax.eval.scoring import Scorer
from resq_jax.models.decoder import IDENTITY, from_weights


@dataclasses.dataclass
class Resolved:
    """What the adapter needs of a model: a whole decoder's inputs and how to make its generation cache."""

    config: Any
    weights: Any  # a mapping of the decoder's weights (float, fake-quant view or packed view)
    hooks: Any
    tokenizer: Any
    description: str
    new_cache: Callable[[int, int], list] | None = None  # (rows, positions) -> an empty cache; None: float

    @classmethod
    def packed(cls, pm, tokenizer, description: str) -> "Resolved":
        """A PackedModel run by the packed runtime, generating through its quantized KV cache."""
        from resq_jax.runtime.kv_cache import init_packed_cache
        from resq_jax.runtime.pack import packed_weights

        return cls(pm.config, packed_weights(pm), pm.hooks, tokenizer, description,
                   functools.partial(init_packed_cache, pm.config, pm.spec))


def resolve(*, model: str | None = None, method: str = "none", checkpoint: str | None = None,
            calib_windows: int = 64, calib_seq_len: int = 512, seed: int = 0, calib_text: str | None = None,
            **settings) -> Resolved:
    """The float model, a recipe quantized on the fly, or a packed checkpoint (module docstring)."""
    from resq_jax.models.loaders import load_model

    if checkpoint:
        if method != "none" or settings:
            raise ValueError("checkpoint= runs the checkpoint's own recipe; drop method= and its settings")
        from resq_jax.runtime.checkpoint import load_checkpoint, runnable

        r = runnable(load_checkpoint(checkpoint, expect_config=None if model is None else load_model(model).config))
        return Resolved(r.config, r.weights, r.hooks, r.tokenizer,
                        f"{checkpoint} ({r.method}, {'packed' if r.packed else 'fake quant'})", r.new_cache)
    qc = None  # a bad method or setting fails before the model loads
    if method != "none":
        from resq_jax.pipeline.recipes import QuantConfig

        qc = QuantConfig(method=method, seed=seed, **settings)
    elif settings:
        raise ValueError(f"settings {', '.join(settings)} need a method= other than none")
    loaded = load_model(model or "smollm2")
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.source} has no tokenizer files")
    if qc is None:
        return Resolved(loaded.config, loaded.weights, IDENTITY, loaded.tokenizer, f"{loaded.source} (float)")
    from resq_jax.data.texts import DEFAULT_CALIB_TEXT, load_text
    from resq_jax.data.windows import calib_windows as sample
    from resq_jax.data.windows import tokenize
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.runtime.pack import try_pack

    windows = sample(tokenize(load_text(calib_text or DEFAULT_CALIB_TEXT).text, loaded.tokenizer), calib_windows,
                     calib_seq_len, seed)
    qm = quantize_model(loaded.config, loaded.weights, qc, windows, progress=False)
    packed, _ = try_pack(qm)
    if packed is None:
        return Resolved(qm.config, qm.weights, qm.hooks, loaded.tokenizer, f"{loaded.source} ({method}, fake quant)")
    return Resolved.packed(packed, loaded.tokenizer, f"{loaded.source} ({method}, packed)")


@register_model("resq-jax")
class ResqJaxLM(TemplateLM):
    """lm-eval model backed by ``resolve(...)`` (module docstring). ``batch_size`` windows per jitted call,
    ``max_length`` tokens of context at most (default: 2048 or the model's own limit, whichever is smaller)."""

    def __init__(self, batch_size: int | str | None = 8, max_length: int | None = None,
                 resolved: Resolved | None = None, device=None, max_batch_size=None, **model_args):
        super().__init__()  # device: the JAX default device; max_batch_size: unused (no automatic batch size)
        self.resolved = resolved if resolved is not None else resolve(**model_args)
        r = self.resolved
        self.tokenizer = r.tokenizer
        self._decoder = from_weights(r.config, dict(r.weights))
        limit = int(getattr(r.config, "max_position_embeddings", 0) or 2048)
        self._max_length = int(max_length) if max_length else min(2048, limit)
        size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.scorer = Scorer(self._decoder, r.hooks, batch_size=size, max_length=self._max_length)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.resolved.config.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context and the first rolling window start from: BOS, else end-of-text (as lm-eval's
        HF backend)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context tokens, continuation tokens)] -> [(log p, is greedy)]."""
        pairs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            pairs.append((whole[:-1], whole[1:]))
        scored = self._score(pairs, disable_tqdm, "loglikelihood")
        out = []
        for (_, _, cont), (logp, greedy) in zip(requests, scored):
            n = len(cont)
            out.append((float(logp[-n:].sum()), bool(greedy[-n:].all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The total log-likelihood of each text, in lm-eval's disjoint rolling windows of ``max_length`` tokens."""
        per_text = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            per_text.append([((None, None), ctx, cont) for ctx, cont in windows])
        flat = [w for ws in per_text for w in ws]
        scores = iter(self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm))
        return [sum(next(scores)[0] for _ in ws) for ws in per_text]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first stop string: requests with the same settings (stop strings,
        max_gen_toks) run together, longest first, ``batch_size`` left-padded rows at a time (a short last batch
        is filled with copies), prompts padded to the scorer's bucket lengths so jit compiles a few shapes."""
        from resq_jax.eval.generate import generate_batch
        from resq_jax.eval.scoring import bucket_length
        from resq_jax.util.progress import progress_bar

        groups: dict[tuple, list] = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = tuple([until] if isinstance(until, str) else until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            room = max(1, self.max_length - max_new)  # context tokens that leave room for the new ones
            groups.setdefault((until, max_new, room), []).append((i, self.tok_encode(context)[-room:]))
        out: list = [None] * len(requests)
        rows = self.scorer.batch_size
        bar = None if disable_tqdm else progress_bar(len(requests), "generate_until", unit="req")
        for (until, max_new, room), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), rows):
                chunk = items[start:start + rows]
                prompts = [ids for _, ids in chunk] + [chunk[-1][1]] * (rows - len(chunk))
                length = bucket_length(len(prompts[0]), room)
                stop = functools.partial(self._stopped, until=until, real_rows=len(chunk))

                cache = None if self.resolved.new_cache is None else self.resolved.new_cache(rows, length + max_new)
                new = generate_batch(self._decoder, prompts, max_new, hooks=self.resolved.hooks,
                                     eos_token_id=self.eot_token_id, cache=cache, length=length, stop=stop)
                for (i, _), ids in zip(chunk, new):
                    text = self.tok_decode(ids)
                    out[i] = text[:min((text.find(s) for s in until if s and s in text), default=len(text))]
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def _stopped(self, row: int, new: list[int], *, until: tuple[str, ...], real_rows: int) -> bool:
        """Whether a generate_until row is done: a filler row at once, a real one when its text holds a stop
        string."""
        return row >= real_rows or any(s and s in self.tok_decode(new) for s in until)

    def _score(self, pairs, disable_tqdm: bool, what: str):
        from resq_jax.util.progress import progress_bar

        bar = None if disable_tqdm else progress_bar(len(pairs), what, unit="req")
        chunk = self.scorer.batch_size * 16  # a bar update every 16 batches; sorting happens within a chunk
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        by_pos: dict[int, Any] = {}
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            for i, s in zip(idx, self.scorer.score([pairs[i] for i in idx])):
                by_pos[i] = s
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return [by_pos[i] for i in range(len(pairs))]


TASKS_DIR = Path(local_tasks.__file__).with_name("tasks")  # the offline tasks (eval/local_tasks.py)
BOOTSTRAP_ITERS = 1000  # resamples for the standard error of a perplexity-like metric (lm-eval's default: 100000)
LOCAL_TASKS = ("cloze-wiki", "nextsent-wiki")


def task_manager(tasks: list[str], include_path: list[str] | None = None):
    """lm-eval's TaskManager over its own tasks, the offline ones and ``include_path``; ValueError naming any of
    ``tasks`` it does not know."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])])
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; the offline ones are {', '.join(LOCAL_TASKS)}"
                         " (hub tasks such as arc_easy need network access; --include-path adds your own YAMLs)")
    return manager


def run_tasks(lm: ResqJaxLM, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
              include_path: list[str] | None = None, seed: int = 0, quiet: bool = False) -> dict:
    """Run lm-eval tasks through ``simple_evaluate`` -> {task: {"metrics": {name: value}, "stderr": {name: value},
    "n": documents scored, "num_fewshot": k}}; the offline tasks of resq_jax/eval/tasks and the folders of
    ``include_path`` (a user's YAMLs, as lm-eval's TaskManager(include_path=...)) are available by name. ``quiet``
    silences lm-eval's notes and progress bars (errors still raise)."""
    from lm_eval.evaluator import simple_evaluate

    manager = task_manager(tasks, include_path)
    # lm-eval prints task notes and bootstrap progress on stdout (ours carries only the table) and bootstraps
    # standard errors in a forked pool, which can deadlock a process running JAX's threads: serial, 1000 draws
    os.environ["DISABLE_MULTIPROC"] = "1"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(os.devnull, "w")) if quiet else sys.stderr
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        res = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed,
                              numpy_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    out = {}
    for task, metrics in res["results"].items():
        values = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "_stderr" not in k}
        errors = {k.split(",")[0].replace("_stderr", ""): v for k, v in metrics.items() if "_stderr," in k}
        n = res.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": values, "stderr": {k: (v if isinstance(v, (int, float)) else None)
                                                  for k, v in errors.items()},
                     "n": n.get("effective", n.get("original")), "num_fewshot": res.get("n-shot", {}).get(task)}
    return out
