"""The dataset functions the task YAMLs of this folder name (lm-eval resolves ``!function local.NAME`` here)."""
from resq_jax.eval.local_tasks import cloze_wiki, nextsent_wiki

__all__ = ["cloze_wiki", "nextsent_wiki"]
