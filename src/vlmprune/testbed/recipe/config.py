"""The recipe's configuration (``TrainConfig``, validated) and what a resumed run may change."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..questions import FAMILIES


@dataclass
class TrainConfig:
    """Every setting of a training run: ``vision_*`` stage 1, ``llm_*`` and the auxiliaries, guides and
    background dropout stage 2, ``cls_*`` stage 3. ``validate()`` checks them together."""

    out: str = "runs/testbed"
    seed: int = 0
    vision_steps: int = 2000
    vision_batch: int = 8
    vision_lr: float = 1e-3
    vision_object_loss: bool = True  # per-patch colour/shape/char losses also averaged over labelled patches only
    vision_pos_init: str = "sincos"  # or "default": 2-D sine-cosine init of the vision position embeddings
    vision_dense: float = 0.5  # share of stage-1 scenes drawn dense (12-24 objects): more labelled patches per step
    vision_attn_init: str = "default"  # or "mimetic": query = key projections at init (see mimetic_attention)
    llm_steps: int = 1500
    llm_batch: int = 8
    llm_lr: float = 1e-3
    warmup: int = 60
    turns: int = 10
    projector_init: str = "standardize"  # or "default": see standardize_projector
    patch_words: float = 1.0  # weight of the patch-naming auxiliary (see patch_word_targets); 0 = off
    patch_position: bool = True  # patch naming also names the object's corner (colour / shape / corner cycle)
    ground_words: float = 0.0  # weight of the projector-grounding auxiliary (see grounding_loss); 0 = off
    independent_turns: bool = False  # turns share the image prefix but not each other (4-D mask, eval positions)
    guide_weight: float = 0.5  # stage-2 attention guidance (see AttentionGuide); 0 = off
    guide_layers: tuple[int, ...] = (0, 1)
    guide_heads: int = 2
    guide_target: float = 0.9  # the guide stops pulling once this share of attention is on object/text patches
    guide_focus: bool = False  # guide each answer row to the patches its question names (see question_patches)
    guide_rows: str = "words+read"  # "words": question tokens naming a colour/shape (word_guide_targets); "words+read": also read_guide_targets
    guide_read_layers: tuple[int, ...] | None = (2,)  # "words+read": layers guiding the read rows (None: guide_layers)
    guide_count: bool = True  # words guide: a count question's plural word -> uniform over sink + the objects' centres
    guide_read_stop: bool = True  # words+read guide: the row predicting the answer's end -> the cell after the code
    guide_read_prev: bool = True  # words+read guide: each code cell after the first -> the cell left of it (word layers)
    guide_position: bool = True  # words guide: a position question's answer row -> its shape words, one per head
    guide_position_layers: tuple[int, int] = (3, 4)  # (shape words re-fetch their patches, answer row reads the words)
    bg_keep: float = 0.1  # share of background image tokens fed to the decoder early in stage 2 (1 = all; see background_keep)
    bg_ramp: tuple[float, float] = (0.4, 0.7)  # stage-2 fractions over which that share ramps up to 1
    text_prob: float = 0.5
    cls_steps: int = 100  # stage 3: the [CLS] pathway PruMerge reads (0 = skip)
    cls_batch: int = 16
    cls_lr: float = 2e-3
    cls_attention_weight: float = 0.2
    checkpoint_every: int = 100
    threads: int = 0  # 0 = torch default
    families: tuple[str, ...] | None = None  # stage-2 question families (None: all; for curricula / probes)
    max_objects: int | None = None  # stage-2 scenes with at most this many objects (None: 1-9)
    vision_from: str | None = None  # reuse a trained vision tower (train_state.pt or model folder): skip stage 1
    vision_overrides: dict | None = None  # architecture overrides (tests train tiny models)
    text_overrides: dict | None = None

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the bad field and what it accepts."""
        checks = [
            (min(self.vision_steps, self.llm_steps, self.cls_steps) >= 0, "step counts must be >= 0"),
            (min(self.vision_batch, self.llm_batch, self.cls_batch, self.turns, self.checkpoint_every) >= 1,
             "batch sizes, turns and checkpoint_every must be >= 1"),
            (self.projector_init in ("standardize", "default"),
             f"projector_init must be 'standardize' or 'default', got {self.projector_init!r}"),
            (self.vision_pos_init in ("default", "sincos"),
             f"vision_pos_init must be 'default' or 'sincos', got {self.vision_pos_init!r}"),
            (0 <= self.vision_dense <= 1, f"vision_dense must be in [0, 1], got {self.vision_dense}"),
            (self.vision_attn_init in ("default", "mimetic"),
             f"vision_attn_init must be 'default' or 'mimetic', got {self.vision_attn_init!r}"),
            (self.guide_weight >= 0, f"guide_weight must be >= 0, got {self.guide_weight}"),
            (self.patch_words >= 0, f"patch_words must be >= 0, got {self.patch_words}"),
            (not self.patch_position or self.patch_words > 0, "patch_position needs patch_words > 0"),
            (self.ground_words >= 0, f"ground_words must be >= 0, got {self.ground_words}"),
            (0 < self.guide_target <= 1, f"guide_target must be in (0, 1], got {self.guide_target}"),
            (self.guide_heads >= 1, f"guide_heads must be >= 1, got {self.guide_heads}"),
            (not self.families or set(self.families) <= set(FAMILIES),
             f"families must be among {FAMILIES}, got {self.families}"),
            (self.max_objects is None or 1 <= self.max_objects <= 9, "max_objects must be in 1..9 or None"),
            (0 < self.bg_keep <= 1, f"bg_keep must be in (0, 1], got {self.bg_keep}"),
            (len(self.bg_ramp) == 2 and 0 <= self.bg_ramp[0] <= self.bg_ramp[1] <= 1,
             f"bg_ramp must be two stage-2 fractions 0 <= start <= end <= 1, got {self.bg_ramp}"),
            (self.bg_keep == 1 or not (self.ground_words or self.independent_turns),
             "bg_keep < 1 cannot be combined with ground_words or independent_turns"),
            (self.guide_rows in ("answer", "words", "words+read"),
             f"guide_rows must be 'answer', 'words' or 'words+read', got {self.guide_rows!r}"),
            (not self.guide_count or self.guide_rows.startswith("words"),
             "guide_count needs guide_rows='words' or 'words+read'"),
            (not self.guide_read_stop or self.guide_rows == "words+read",
             "guide_read_stop needs guide_rows='words+read'"),
            (not self.guide_read_prev or self.guide_rows == "words+read",
             "guide_read_prev needs guide_rows='words+read'"),
            (not self.guide_position or self.guide_rows.startswith("words"),
             "guide_position needs guide_rows='words' or 'words+read'"),
            (len(self.guide_position_layers) == 2,
             f"guide_position_layers must be two decoder layers (words, answer), got {self.guide_position_layers}"),
            (self.guide_read_layers is None or self.guide_rows == "words+read",
             "guide_read_layers applies to guide_rows='words+read' only"),
            (self.guide_rows == "answer" or (self.guide_weight > 0 and not self.guide_focus),
             f"guide_rows={self.guide_rows!r} needs guide_weight > 0 and replaces guide_focus (answer rows only)"),
            (self.vision_from is None or Path(self.vision_from).exists(),
             f"vision_from={self.vision_from}: no such file or folder (a run's train_state.pt or a saved model)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        return self

    def with_overrides(self, items: list[str]) -> "TrainConfig":
        """A copy with ``key=value`` overrides (values parsed as JSON when they parse, else strings)."""
        fields = asdict(self)
        new = dict(fields)
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise ValueError(f"bad override {item!r}: expected key=value with key one of {sorted(fields)}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            new[key] = tuple(value) if isinstance(value, list) else value
        return TrainConfig(**new).validate()


#: the words guide's add-ons, all off: what a config with ``guide_rows="answer"`` must also say,
#: since validation ties each add-on to the words guide
WORDS_GUIDE_ADDONS_OFF = dict(guide_count=False, guide_read_stop=False, guide_read_prev=False, guide_position=False)


#: fields a resumed run may change: bookkeeping (always) and the stage-3 settings (until stage 3 has
#: taken a step); none touches a stage already run, so the result equals a straight run with them
_ANYTIME_FIELDS = ("threads", "checkpoint_every")
_STAGE3_FIELDS = ("cls_steps", "cls_batch", "cls_lr", "cls_attention_weight")


def resume_config(saved: TrainConfig, asked: TrainConfig, state: dict, log) -> TrainConfig:
    """The config a run resumed at ``state`` (``{"stage", "step"}``) continues with: ``saved``, plus the
    safe changes ``asked`` makes; every change, applied or kept back, is reported through ``log``."""
    if asdict(saved) == asdict(asked):
        return saved
    allowed = _ANYTIME_FIELDS + (_STAGE3_FIELDS if (state["stage"], state["step"]) <= (3, 0) else ())
    updates = {k: getattr(asked, k) for k in allowed if getattr(asked, k) != getattr(saved, k)}
    ignored = sorted(k for k, v in asdict(asked).items() if v != getattr(saved, k) and k not in updates)
    if updates:
        log(f"note: resuming with {updates} (these do not affect the stages already run)")
    if ignored:
        log(f"note: resuming {asked.out} written with a different {', '.join(ignored)}; keeping the saved values")
    return TrainConfig(**{**asdict(saved), **updates})
