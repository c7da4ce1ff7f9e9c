"""Evaluation: the reward matrix (variants × rewards), eval prompt loading, variant specs, reports.

* :func:`run_matrix` (``rtdmd.eval.matrix``) and ``python -m rtdmd.eval`` (runs under ``torchrun``);
* :func:`parse_variant` / :func:`parse_variants` (``rtdmd.eval.variants``: the variant spec syntax);
* :func:`load_eval_prompts` (``rtdmd.eval.prompts``);
* ``rtdmd.eval.report``: metadata.json / table.csv / table.md / grids, MLflow payload;
* ``rtdmd.metrics.toy2d``: SWD, MMD, coverage, tilted-target sampling.

Inference (prompts → PNGs for any LoRA regime) is ``python -m rtdmd.infer``.
"""
from rtdmd.eval.matrix import EvalInputError, run_matrix
from rtdmd.eval.prompts import EmptyPromptsError, MissingDatasetError, load_eval_prompts
from rtdmd.eval.variants import Variant, VariantError, parse_variant, parse_variants

__all__ = ["run_matrix", "EvalInputError", "EmptyPromptsError", "MissingDatasetError", "load_eval_prompts",
           "Variant", "VariantError", "parse_variant", "parse_variants"]
