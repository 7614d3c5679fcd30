"""ATP-LLaVA: learnable, instance- and layer-wise visual-token pruning between decoder layers.

Model-agnostic tensor code (torch only): the decoder-stage integration
(``vlmprune.integrations.atp``) computes head-averaged, post-softmax attention rows after a
pruning layer and calls ``ATPPruner``; nothing here sees a model. One sub-topic per module:

* ``scores``: S_self, S_cross and S_r from the attention rows;
* ``spatial``: S_s from nested uniform grids;
* ``units``: samples whose tokens lie on several grids (judging groups, score maps);
* ``thresholds``: the threshold MLP of one module;
* ``soft``: training maths (soft masks, log-mask bias, temperature, straight-through count,
  range hinge);
* ``hard``: the keep rules at inference;
* ``budget``: module positions, all-layer token averages, budget losses, fixed-ratio schedule;
* ``config``: ``ATPConfig`` and the checkpoint's config file;
* ``pruner``: ``ATPPruner``, which ties them together (and saves / loads checkpoints).

Flow at a module after decoder layer ``l`` (0-indexed)::

    scores = pruner.scores(attn_vv, attn_tv, valid, text_mask)      # S_self, S_cross, S_r  [B, V]
    train:  step = pruner.soft_step(l, scores, patch_index, prev)   # soft M, cumulative, soft count
            prev = step.cumulative
            bias = pruner.log_mask(step.cumulative)                 # added to later layers' visual keys
            ...  loss = task + pruner.budget_loss([step.count for each module]).total
    infer:  step = pruner.hard_step(l, scores, patch_index)         # keep [B, V] over alive slots

Shapes: ``B`` samples; ``V`` alive visual tokens per sample, padded to the batch maximum
(``valid`` [B, V] bool; valid slots in sequence order, padding anywhere); ``T`` instruction
query rows, padded (``text_mask`` [B, T]); ``N`` patches of the full grid (576 = 24 x 24 for
LLaVA-1.5); ``patch_index`` [B, V] long, the grid index (0..N-1) of each slot (anything on
padding). The design choices are in ``docs/design/atp.md``.
"""

from .budget import (
    DEFAULT_LAYERS,
    DEFAULT_NUM_LAYERS,
    TARGET_REDUCTIONS,
    BudgetLoss,
    average_tokens,
    budget_loss,
    check_layers,
    check_target,
    equivalent_target,
    fixed_ratio_counts,
    fixed_ratio_for_target,
    min_average_tokens,
    per_layer_counts,
    scale_layers,
)
from .config import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, ATPConfig
from .hard import fixed_priority, hard_keep, topk_keep
from .pruner import ATPPruner, HardStep, SoftStep, per_sample_thresholds
from .scores import SCORE_MODES, ATPScores, redundancy_scores, redundancy_scores_from_sums
from .soft import (
    COMBINE_MODES,
    TAU_SCHEDULES,
    anneal_tau,
    cumulative_mask,
    log_mask,
    range_hinge,
    soft_mask,
    straight_through_count,
    topk_soft_mask,
)
from .spatial import default_strides, spatial_grids, spatial_scores
from .thresholds import ATPModule, Thresholds
from .units import UnitSlots

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_NUM_LAYERS",
    "SCORE_MODES",
    "COMBINE_MODES",
    "TARGET_REDUCTIONS",
    "TAU_SCHEDULES",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "ATPScores",
    "Thresholds",
    "SoftStep",
    "HardStep",
    "BudgetLoss",
    "ATPConfig",
    "ATPModule",
    "ATPPruner",
    "UnitSlots",
    "redundancy_scores",
    "redundancy_scores_from_sums",
    "default_strides",
    "spatial_grids",
    "spatial_scores",
    "soft_mask",
    "cumulative_mask",
    "log_mask",
    "hard_keep",
    "fixed_priority",
    "topk_keep",
    "topk_soft_mask",
    "fixed_ratio_counts",
    "check_layers",
    "check_target",
    "fixed_ratio_for_target",
    "anneal_tau",
    "straight_through_count",
    "range_hinge",
    "per_sample_thresholds",
    "scale_layers",
    "per_layer_counts",
    "average_tokens",
    "min_average_tokens",
    "equivalent_target",
    "budget_loss",
]
