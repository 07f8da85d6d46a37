"""The base model a recipe names: pinned to its Hub commit, and checked from its files before
any work, so that every mistake in it is one line before the run dir is touched."""

from __future__ import annotations

from pathlib import Path

from greentune.errors import UserError
from greentune.models.hub import resolve_model
from greentune.models.loader import check_model_dir, check_weights_match, load_config, max_positions
from greentune.models.mxfp4_checkpoint import check_quant_base
from greentune.models.support import check_family
from greentune.recipe import Recipe


def pin_base_model(recipe: Recipe) -> tuple[Recipe, str]:
    """(recipe with `base_model_commit` set for a Hub id, the local folder to load from)."""
    resolved = resolve_model(recipe.base_model, revision=recipe.base_model_commit)
    if resolved.commit is not None:
        recipe = recipe.model_copy(update={"base_model_commit": resolved.commit})
    return recipe, str(resolved.path)


def check_base(base: str, recipe: Recipe):
    """The folder's files, family, positions and tensors against what `recipe` asks of them;
    returns the model's config."""
    check_model_dir(base)
    config = load_config(Path(base), recipe.trust_remote_code)
    if not (recipe.moe and recipe.moe.upcycle):  # an upcycled base is checked as the Mixtral it becomes
        check_family(config.to_dict(), recipe.export)
    limit = max_positions(config)
    if limit is not None and recipe.data.max_seq_len > limit:
        raise UserError(
            f"data.max_seq_len {recipe.data.max_seq_len} exceeds the model's {limit} positions "
            f"({base}/config.json)"
        )
    check_weights_match(base, config)  # missing / unexpected / mis-shaped tensors, from the headers
    check_quant_base(config, recipe.method.quant_base)  # an MXFP4 checkpoint trains quantised
    return config
