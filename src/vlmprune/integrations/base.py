"""The per-family adapter: where a model family keeps its parts, and the steps shared by the families.

An **adapter** is per-family knowledge written as data: where the vision tower, its encoder
layers (and the last layer's ``q_proj`` / ``k_proj``), the projector, the language model and its
decoder layers live, and which config fields hold the image token id, the vision feature layer and
the feature-select strategy. ``ModelAdapter`` resolves those paths and implements the steps that
are the same across LLaVA-like families (encode images, project, embed); a family whose steps
differ (LLaVA-NeXT's any-res tiling, Qwen2-VL's merged patches and M-RoPE) subclasses it in its
own file (``llava_next.py``, ``qwen2_vl.py``) and registers an instance with ``register_adapter``.

Everything the stages need to know about a family's visual tokens comes from the adapter:
``image_layout`` (the tower passes of a batch's images and each image's placeholder count, a
``layout.VisualLayout``), ``encode`` (pixels -> per-unit features), ``pack`` (a method's per-unit
reduction -> the per-image tokens the LLM receives), ``cls_index`` (where a tower's [CLS] sits),
``rotary`` (the language model's rotary function) and ``method_problem`` (methods that cannot run
on the family, with the reason). Families whose positions are not Llama's ``[B, L]`` or whose
tokens keep their own positions (Qwen2-VL's M-RoPE) also say: ``lm_positions`` /
``layer_position_ids`` / ``lm_layout`` (the decoder stage's positions in the family's form),
``compact_positions`` (whether survivors may be renumbered), ``pack_slots`` (which placeholder
slot each kept token takes), ``prompt_positions`` / ``after_rewrite`` / ``sequence_inputs``
(the vision stage's rewrite of positions and per-token inputs), ``image_geometry`` (keywords that
describe the images, e.g. ``image_grid_thw``) and ``encode_with_signals`` / ``importance_score``
(the score the [CLS]-based methods use). Families with video inputs also list one adapter view
per modality (``modality_views``: the video view names ``get_video_features``, its pixels
keyword, placeholder token and geometry).

For the bench and the cost model, the adapter also answers from the **config alone** (every
config-only method accepts a ``transformers`` config in place of the model; ``get_adapter`` takes
one too, by ``config_types``): ``size_layout`` (the layout of an image of (H, W) pixels as the
family's processor prepares it), ``unit_tokens`` (each tower pass's sequence length and projector
rows), ``vision_shape`` (the tower's and projector's widths, for FLOP counts), and, for a random
prompt of the family's form, ``image_prompt_ids``, ``random_image_inputs`` and
``sequence_extras``.

The handle that ``vlmprune.apply`` returns and its stats are in ``handle.py``.
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# PruneHandle / PruneStats stay importable from here: the vision and decoder packages import them from base.
from .handle import PHASES, PruneHandle, PruneStats, in_phase  # noqa: F401
from .layout import VisualLayout, VisualUnit

__all__ = [
    "UnsupportedModelError",
    "ModelAdapter",
    "register_adapter",
    "get_adapter",
    "adapters",
]

#: Modules that define (and register) adapters; imported lazily by ``get_adapter``.
_ADAPTER_MODULES = ("vlmprune.integrations.llava", "vlmprune.integrations.llava_next",
                    "vlmprune.integrations.qwen2_vl", "vlmprune.integrations.video_llava",
                    "vlmprune.integrations.llava_onevision")


class UnsupportedModelError(ValueError):
    """The model's family has no adapter (the message names the supported families)."""


def _resolve(root: Any, path: str) -> Any:
    """Follow a dotted attribute path (``"model.vision_tower"``) from ``root``; ``""`` is ``root``."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


# model -> {(base_paths, vision_tower, language_model): (path, base module)}: ``base_model`` is asked
# at every step of every forward, and trying the paths through nn.Module attributes costs ~8 us
_BASES: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _has_path(root: Any, path: str) -> bool:
    try:
        _resolve(root, path)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class ModelAdapter:
    """Where one model family keeps its parts, as attribute paths; plus the shared steps.

    Paths are relative to the *base* multimodal model (``LlavaModel``), which is found from the
    model the user passes (e.g. ``LlavaForConditionalGeneration``) by trying ``base_paths`` in order.
    """

    family: str
    #: Class names of the models this adapter accepts (the user's model, or its base model).
    model_classes: tuple[str, ...]
    #: Paths from the user's model to the base multimodal model, tried in order ("" = itself).
    base_paths: tuple[str, ...] = ("model", "")
    vision_tower: str = "vision_tower"
    #: From the vision tower to its ModuleList of encoder layers (candidates, first found wins:
    #: transformers 5 flattened CLIPVisionModel, 4.x nested it under ``vision_model``).
    vision_layers: tuple[str, ...] = ("encoder.layers", "vision_model.encoder.layers")
    #: From one encoder layer to its query / key projections (nn.Linear, heads concatenated).
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    projector: str = "multi_modal_projector"
    language_model: str = "language_model"
    #: From the language model to its ModuleList of decoder layers.
    decoder_layers: str = "layers"
    # config field names (on the multimodal config)
    image_token_id_field: str = "image_token_id"
    feature_layer_field: str = "vision_feature_layer"
    select_strategy_field: str = "vision_feature_select_strategy"
    #: Vision-config ``model_type``s whose sequence starts with a [CLS] token.
    cls_vision_types: tuple[str, ...] = ("clip_vision_model",)
    #: Select strategies that drop the [CLS] token before the projector (the rest keep it).
    cls_dropping_strategies: tuple[str, ...] = ("default",)
    #: The base model's method that turns pixel_values into projected image tokens; ``generate()``
    #: calls it before the prefill and passes its output as ``mm_encoder_outputs[modality]``.
    image_features_method: str = "get_image_features"
    #: Key of the image features in ``mm_encoder_outputs``.
    image_modality: str = "image"
    #: Keyword of the forward (and of ``image_features_method``) that carries this modality's pixels.
    pixel_values_field: str = "pixel_values"
    #: Other (deprecated) keywords of the forward that carry the same pixels (e.g. Video-LLaVA's
    #: ``pixel_values_images``); the vision stage reads and clears them too.
    pixel_values_aliases: tuple[str, ...] = ()
    #: Index of the [CLS] token in the tower's output sequence (when ``tower_has_cls``).
    cls_index: int = 0
    #: ``(method, reason)`` pairs: methods that cannot run on this family (``method_problem``).
    unsupported_methods: tuple[tuple[str, str], ...] = ()
    #: Names of the family's own options, which ``vlmprune.apply`` accepts next to the method's
    #: (``configure``); e.g. LLaVA-NeXT's ``newlines``.
    family_options: tuple[str, ...] = ()
    #: Whether a decoder-stage method may renumber positions contiguously (``positions="compact"``);
    #: when False the decoder stage keeps every survivor's original positions.
    compact_positions: bool = True
    #: Keywords of ``image_features_method`` beyond the pixels that describe the images' geometry
    #: (e.g. Qwen2-VL's ``image_grid_thw``); the vision stage passes them to ``image_layout``.
    image_geometry: tuple[str, ...] = ()
    #: Per-token [B, L] keywords of the model's forward that the vision stage's rewrite compacts
    #: with ``input_ids`` (e.g. Qwen2-VL's ``mm_token_type_ids``).
    sequence_inputs: tuple[str, ...] = ()
    #: What the [CLS]-based vision methods (cls-topk, prumerge, prumerge+) score tokens by on this
    #: family (``encode_with_signals``; shown by ``list_methods()``).
    importance_score: str = "[CLS] attention of the last vision layer"
    #: From one decoder layer to the linears LoRA adapts (``lora_target_modules``): the attention
    #: and MLP projections of the language model, as in LLaVA's LoRA recipe (never the vision
    #: tower or the projector).
    lora_targets: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    #: ``model_type``s of the multimodal configs of this family (``get_adapter`` on a config).
    config_types: tuple[str, ...] = ()

    # ---------------------------------------------------------------- finding the parts
    def matches(self, model: Any) -> bool:
        """Whether this adapter handles ``model`` (its class, or its base model's class; a config:
        its ``model_type``)."""
        from .compat import is_config

        if is_config(model):
            return getattr(model, "model_type", None) in self.config_types
        if type(model).__name__ in self.model_classes:
            return True
        return any(_has_path(model, p) and type(_resolve(model, p)).__name__ in self.model_classes
                   for p in self.base_paths if p)

    def base_model(self, model: Any) -> nn.Module:
        """The base multimodal module (LlavaModel) holding vision tower, projector and LM (found
        once per model object and remembered while the model lives)."""
        key = (self.base_paths, self.vision_tower, self.language_model)
        try:
            known = _BASES.get(model, {}).get(key)
        except TypeError:  # not weakly referenceable: looked up each time
            known = None
        if known is not None:
            path, base = known
            try:
                if _resolve(model, path) is base:  # still the module at that path
                    return base
            except AttributeError:
                pass
        for path in self.base_paths:
            if _has_path(model, path):
                base = _resolve(model, path)
                if _has_path(base, self.vision_tower) and _has_path(base, self.language_model):
                    try:
                        _BASES.setdefault(model, {})[key] = (path, base)
                    except TypeError:
                        pass
                    return base
        raise UnsupportedModelError(f"cannot find the {self.family} base model (tried {self.base_paths}) "
                                    f"in {type(model).__name__}")

    def config(self, model: Any) -> Any:
        """The multimodal config of ``model`` (``model`` itself when it is a config)."""
        from .compat import is_config

        return model if is_config(model) else self.base_model(model).config

    def get_vision_tower(self, model: Any) -> nn.Module:
        return _resolve(self.base_model(model), self.vision_tower)

    def get_vision_layers(self, model: Any) -> nn.ModuleList:
        """The vision tower's encoder layers (a ModuleList; [-1] is the last layer)."""
        tower = self.get_vision_tower(model)
        for path in self.vision_layers:
            if _has_path(tower, path):
                return _resolve(tower, path)
        raise AttributeError(f"{type(tower).__name__} has none of {self.vision_layers}")

    def get_last_qk(self, model: Any) -> tuple[nn.Module, nn.Module]:
        """The last vision encoder layer's (q_proj, k_proj) linears (the source of the [CLS] signals)."""
        last = self.get_vision_layers(model)[-1]
        return _resolve(last, self.q_proj), _resolve(last, self.k_proj)

    def get_projector(self, model: Any) -> nn.Module:
        return _resolve(self.base_model(model), self.projector)

    def get_language_model(self, model: Any) -> nn.Module:
        return _resolve(self.base_model(model), self.language_model)

    def get_decoder_layers(self, model: Any) -> nn.ModuleList:
        return _resolve(self.get_language_model(model), self.decoder_layers)

    def get_input_embeddings(self, model: Any) -> nn.Module:
        return self.base_model(model).get_input_embeddings()

    def lora_target_modules(self, model: Any, targets: tuple[str, ...] | None = None) -> list[str]:
        """Qualified names (from ``model``, as ``named_modules`` spells them) of the linears LoRA
        adapts: ``targets`` (default ``lora_targets``; paths from one decoder layer) in every decoder
        layer of the language model. A path no decoder layer has raises ``ValueError`` naming it."""
        targets = self.lora_targets if targets is None else tuple(targets)
        layers = self.get_decoder_layers(model)
        prefix = {id(m): n for n, m in model.named_modules()}.get(id(layers))
        if prefix is None:
            raise ValueError(f"the decoder layers of this {self.family} model are not among its modules")
        missing = [t for t in targets if not any(_has_path(layer, t) for layer in layers)]
        if missing:
            raise ValueError(f"no decoder layer of this {self.family} model has {', '.join(missing)}; LoRA targets "
                             f"are paths inside a decoder layer, e.g. {', '.join(self.lora_targets[:2])}")
        names = [f"{prefix}.{i}.{t}" for i, layer in enumerate(layers) for t in targets if _has_path(layer, t)]
        bad = [n for n in names if not isinstance(_resolve(model, n), nn.Linear)]
        if bad:
            raise ValueError(f"LoRA adapts linear layers; {bad[0]} is a {type(_resolve(model, bad[0])).__name__}")
        return names

    # ---------------------------------------------------------------- config knowledge
    def image_token_id(self, model: Any) -> int:
        return int(getattr(self.config(model), self.image_token_id_field))

    def vision_feature_layer(self, model: Any) -> int | list[int]:
        return getattr(self.config(model), self.feature_layer_field)

    def select_strategy(self, model: Any) -> str:
        return getattr(self.config(model), self.select_strategy_field)

    def vision_config(self, model: Any) -> Any:
        return self.config(model).vision_config

    def text_config(self, model: Any) -> Any:
        return self.config(model).text_config

    def tower_has_cls(self, model: Any) -> bool:
        """Whether the vision tower's sequence starts with a [CLS] token (CLIP yes, SigLIP no)."""
        return getattr(self.vision_config(model), "model_type", None) in self.cls_vision_types

    def patch_grid(self, model: Any) -> tuple[int, int]:
        """(H, W) of the patch grid of one tower pass (one image; one crop for any-res families)."""
        vc = self.vision_config(model)
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def tokens_per_image(self, model: Any, strategy: str | None = None) -> int:
        """Tokens one tower pass contributes when not pruned (N patches, +1 if CLS is kept): the N
        that vision-stage budgets (``keep``) refer to. For LLaVA-1.5 one pass is one image."""
        h, w = self.patch_grid(model)
        strategy = self.select_strategy(model) if strategy is None else strategy
        keeps_cls = self.tower_has_cls(model) and strategy not in self.cls_dropping_strategies
        return h * w + int(keeps_cls)

    def fixed_image_tokens(self, model: Any) -> int | None:
        """Placeholder tokens of every image when all images get the same count (LLaVA-1.5: N),
        else None (any-res families: the count depends on the image size)."""
        return self.tokens_per_image(model)

    def budget_tokens(self, model: Any, stage: str) -> int:
        """The most visual tokens a budget may name: per tower pass for the vision stage, per
        image for the decoder stage."""
        return self.tokens_per_image(model)

    def configure(self, **options: Any) -> "ModelAdapter":
        """This adapter with the family options ``options`` set (a copy; ``self`` when none)."""
        if not options:
            return self
        unknown = sorted(set(options) - set(self.family_options))
        if unknown:
            raise ValueError(f"{self.family} has no option {', '.join(unknown)}"
                             + (f"; its options: {', '.join(self.family_options)}" if self.family_options else ""))
        import dataclasses

        return dataclasses.replace(self, **options)

    def modality_views(self, model: Any) -> tuple["ModelAdapter", ...]:
        """One adapter per visual modality the vision stage reduces, the image one first: each
        names its ``image_features_method``, ``image_modality`` key, ``pixel_values_field``,
        placeholder token (``image_token_id``) and ``image_geometry``, and its own layout /
        encode / pack steps. Here images only (``(self,)``); families with video inputs add a
        video view."""
        return (self,)

    def method_problem(self, method: str) -> str | None:
        """Why ``method`` cannot run on this family, or None."""
        return dict(self.unsupported_methods).get(method)

    def rotary(self, model: Any) -> Any:
        """The language model's rotary function ``(hidden, position_ids) -> (cos, sin)``, or None."""
        return getattr(self.get_language_model(model), "rotary_emb", None)

    def lm_positions(self, position_ids: Tensor | None, bsz: int, length: int, device: Any) -> Tensor:
        """The ``position_ids`` a language-model forward received -> the family's form, here
        [B, L] long (Llama-style rope); None -> 0..L-1 (what the model derives on an empty cache)."""
        if position_ids is None:
            return torch.arange(length, device=device)[None, :].expand(bsz, length)
        return position_ids.to(device).expand(bsz, length)

    def layer_position_ids(self, positions: Tensor) -> Tensor | None:
        """What a decoder layer receives as ``position_ids`` for ``positions`` in the family's form
        (here the same [B, L] tensor)."""
        return positions

    def lm_layout(self, model: Any, visual: Tensor, position_ids: Tensor | None = None,
                  rotary: Any = None) -> VisualLayout:
        """The decoder stage's layout of one prefill: the visual columns ``visual`` [B, L] bool,
        the positions in the family's form (``lm_positions`` of the language model's
        ``position_ids``) and the rotary function (``rotary``, default ``self.rotary(model)``)."""
        bsz, length = visual.shape
        positions = self.lm_positions(position_ids, bsz, length, visual.device)
        return VisualLayout().with_sequence(visual, positions, rotary if rotary is not None else self.rotary(model))

    def image_counts(self, model: Any, images: dict[str, Any]) -> tuple[int, ...] | None:
        """Placeholder count of each image of a forward, from its image keywords ``images`` (the
        base model's ``pixel_values_field`` with ``image_sizes`` / the ``image_geometry`` keywords, or the
        encoder outputs ``generate`` passes as ``mm_encoder_outputs``); None when it has neither."""
        from .compat import K

        mm = images.get(K.MM_ENCODER_OUTPUTS) or {}
        if mm.get(self.image_modality) is not None:
            tokens = self.image_tokens(mm[self.image_modality])
            if tokens is not None:
                return tuple(int(t.shape[0]) for t in tokens)
        pixels = images.get(self.pixel_values_field)
        if pixels is None:
            return None
        geometry = {n: images[n] for n in self.image_geometry if images.get(n) is not None}
        return tuple(self.image_layout(model, pixels, images.get(K.IMAGE_SIZES), None, **geometry).tokens_per_image)

    def grid_layout(self, model: Any, layout: VisualLayout, embeds: Tensor, images: dict[str, Any]) -> VisualLayout:
        """The decoder stage's ``layout`` (``lm_layout``: visual columns, positions) with each
        image's placeholder run and its grids: which unit's grid every placeholder lies on and
        where (``VisualLayout.with_grids``; the family's rule is ``image_grids``). ``embeds``
        [B, L, D] are the language model's input embeddings, ``images`` the forward's image
        keywords (``image_counts``, from their shapes). The prompt's placeholder count is checked
        against the images' (``VisualLayout.check_placeholders``) where the device is read anyway: by
        the family's ``image_grids`` when it reads, else by the method (ATP's start-of-prefill read)."""
        counts = self.image_counts(model, images)
        if counts is None:
            raise ValueError(f"vlmprune: cannot tell the {self.family} images' token counts in this forward "
                             "(pass pixel_values with the processor's image keywords, or mm_encoder_outputs)")
        runs = layout.with_runs(counts)
        units, unit_of, patch_of = self.image_grids(model, runs, embeds)
        return runs.with_grids(units, unit_of, patch_of)

    def video_placeholders(self, model: Any, layout: VisualLayout, images: dict[str, Any]
                           ) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], Tensor] | None:
        """For ``grid_layout`` with videos: ((image counts, video counts), kinds [P] long on the device,
        1 where ``layout``'s placeholder is a video's, in (batch, sequence) order) when the forward has
        video inputs (the video view's ``image_counts``) and its input ids; None otherwise, when the
        image rule applies."""
        from .compat import K

        views = self.modality_views(model)
        if len(views) < 2:
            return None
        video_counts = views[1].image_counts(model, images)
        ids = images.get(K.INPUT_IDS)
        video_id = getattr(self.config(model), views[1].image_token_id_field, None)
        if not video_counts or ids is None or video_id is None:
            return None
        kinds = (ids.to(layout.visual.device) == int(video_id))[layout.visual].long()
        return (tuple(views[0].image_counts(model, images) or ()), tuple(video_counts)), kinds

    def image_grids(self, model: Any, layout: VisualLayout, embeds: Tensor) -> tuple[tuple[VisualUnit, ...], Tensor, Tensor]:
        """The grids of ``layout``'s images (their runs known) -> (units, unit_of [P], patch_of [P]):
        the unit (index into units, -1 = on no grid) and raster patch of every placeholder, in
        (batch, sequence) order. LLaVA-1.5's rule: one unit per image on ``patch_grid``; image
        ``i``'s j-th placeholder is patch j (a kept [CLS], strategy ``"full"``, lies on no grid)."""
        h, w = self.patch_grid(model)
        units, unit_of, patch_of = [], [], []
        for i, n in enumerate(layout.tokens_per_image):
            lead = n - h * w
            if lead not in (0, 1):
                raise ValueError(f"vlmprune: image {i} has {n} placeholders; a {self.family} image has {h * w} "
                                 f"patches on its {h} x {w} grid")
            units.append(VisualUnit(image=i, grid=(h, w), has_cls=self.tower_has_cls(model), cls_index=self.cls_index))
            j = torch.arange(n)
            unit_of.append(torch.where(j >= lead, i, -1))
            patch_of.append(torch.where(j >= lead, j - lead, -1))
        return tuple(units), torch.cat(unit_of), torch.cat(patch_of)

    def visual_columns(self, model: Any, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> [B, L] bool, the columns holding visual placeholders."""
        return input_ids == self.image_token_id(model)

    def sequence_layout(self, model: Any, input_ids: Tensor, layout: VisualLayout,
                        position_ids: Tensor | None = None) -> VisualLayout:
        """``layout`` (its images' placeholder counts) with the per-column part of ``input_ids``
        [B, L] filled in: placeholder columns, their image and rank, positions, rotary."""
        return layout.with_sequence(self.visual_columns(model, input_ids), position_ids, self.rotary(model))

    def image_layout(self, model: Any, pixel_values: Tensor, image_sizes: Any = None,
                     strategy: str | None = None, **geometry: Any) -> VisualLayout:
        """The tower passes of ``pixel_values`` [I, 3, H, W]: one unit per image, every image with
        ``tokens_per_image`` placeholders (LLaVA-1.5's rule). ``image_sizes`` is refused;
        ``geometry`` holds the family's ``image_geometry`` keywords (none here)."""
        if image_sizes is not None:
            raise ValueError(f"vlmprune: image_sizes (variable-resolution towers) is not supported by the "
                             f"{self.family} adapter")
        n = self.tokens_per_image(model, strategy)
        grid, has_cls = self.patch_grid(model), self.tower_has_cls(model)
        units = tuple(VisualUnit(image=i, grid=grid, has_cls=has_cls, cls_index=self.cls_index)
                      for i in range(pixel_values.shape[0]))
        return VisualLayout(units=units, tokens_per_image=(n,) * len(units))

    def signal_problem(self, model: Any, strategy: str | None = None) -> str | None:
        """Why [CLS]-attention signals cannot be computed for this model, or None if they can."""
        strategy = self.select_strategy(model) if strategy is None else strategy
        vtype = getattr(self.vision_config(model), "model_type", type(self.get_vision_tower(model)).__name__)
        if not self.tower_has_cls(model):
            return (f"the vision tower ({vtype}) has no [CLS] token; methods driven by [CLS] attention need a "
                    f"tower of type {', '.join(self.cls_vision_types)}")
        if strategy not in self.cls_dropping_strategies:
            return (f"vision_feature_select_strategy={strategy!r} feeds the [CLS] token to the LLM as an image "
                    f"token; [CLS]-attention methods need {' or '.join(map(repr, self.cls_dropping_strategies))} "
                    "(the patch tokens only)")
        try:
            self.get_last_qk(model)
        except (AttributeError, IndexError, TypeError):
            return (f"cannot find q_proj/k_proj of the last vision layer ({' or '.join(self.vision_layers)})"
                    f"[-1].{self.q_proj}")
        return None

    # ---------------------------------------------------------------- geometry (bench, cost model)
    def size_layout(self, model: Any, image_size: Any) -> VisualLayout:
        """The layout of one image of ``image_size`` (H, W) px as the family's processor prepares
        it (model or config). Here every image is resized to one tower pass of ``tokens_per_image``
        placeholders, whatever its size."""
        grid, has_cls = self.patch_grid(model), self.tower_has_cls(model)
        return VisualLayout(units=(VisualUnit(image=0, grid=grid, has_cls=has_cls, cls_index=self.cls_index),),
                            tokens_per_image=(self.tokens_per_image(model),))

    def geometry_inputs(self, model: Any, image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """The geometry keywords of the model's forward for images of ``image_sizes`` (H, W) px
        (none here: every image is one fixed-size pass)."""
        return {}

    def unit_tokens(self, model: Any, layout: VisualLayout) -> list[tuple[int, int]]:
        """Per unit of ``layout``: (tokens in the tower's sequence, rows the projector gets when
        nothing is pruned). Here: the patches (+ [CLS]) and the patches."""
        return [(u.num_patches + int(u.has_cls), u.num_patches) for u in layout.units]

    def vision_shape(self, model: Any) -> dict[str, Any]:
        """The tower's and projector's shapes for FLOP counts (model or config): ``hidden``,
        ``layers``, ``heads``, ``intermediate``, ``mlp_matrices`` (2: fc1/fc2; 3: SwiGLU),
        ``patch_in`` (inputs of the patch embedding per patch), ``window_tokens`` / ``full_layers``
        (windowed attention: patches per window and the full-attention layers; None: every layer
        full), ``projector_dims`` and ``projector_after_pruning`` (whether the projector sees
        the kept tokens only, or is part of the tower and sees every token)."""
        vc, tc = self.vision_config(model), self.text_config(model)
        layer = self.vision_feature_layer(model)
        n_layers = 1 if isinstance(layer, int) else len(layer)
        return {"type": getattr(vc, "model_type", None), "hidden": int(vc.hidden_size),
                "layers": int(vc.num_hidden_layers), "heads": int(vc.num_attention_heads),
                "intermediate": int(vc.intermediate_size), "mlp_matrices": 2,
                "patch_size": int(vc.patch_size), "image_size": getattr(vc, "image_size", None),
                "patch_in": int(getattr(vc, "num_channels", 3)) * int(vc.patch_size) ** 2,
                "window_tokens": None, "full_layers": None,
                "projector_dims": [int(vc.hidden_size) * n_layers, int(tc.hidden_size), int(tc.hidden_size)],
                "projector_after_pruning": True}

    def image_prompt_ids(self, model: Any, count: int) -> list[int]:
        """The token ids one image of ``count`` placeholders occupies in a prompt (here the
        placeholders alone)."""
        return [self.image_token_id(model)] * int(count)

    def random_image_inputs(self, model: Any, image_sizes: list[tuple[int, int]], generator: Any,
                            dtype: Any = None) -> dict[str, Any]:
        """Random pixels (and the geometry keywords) of images of ``image_sizes`` (H, W) px, in
        the family's input form: here ``pixel_values`` [I, 3, S, S]."""
        vc = self.vision_config(model)
        side = int(vc.image_size)
        pixels = torch.randn(len(image_sizes), int(getattr(vc, "num_channels", 3)), side, side, generator=generator)
        return {"pixel_values": pixels.to(dtype or torch.float32), **self.geometry_inputs(model, image_sizes)}

    def sequence_extras(self, model: Any, input_ids: Tensor) -> dict[str, Tensor]:
        """Per-token inputs of the model's forward besides ids and mask, for a prompt ``input_ids``
        [B, L] (none here)."""
        return {}

    # ---------------------------------------------------------------- shared steps
    def select_features(self, hidden_states: tuple[Tensor, ...], layer: int | list[int], strategy: str) -> Tensor:
        """Vision hidden states -> pre-projector features [B, N(+1), D * n_layers] (LLaVA's rule)."""
        layers = [layer] if isinstance(layer, int) else list(layer)
        pool = [hidden_states[i] for i in layers]  # each [B, 1 + N, D]
        if strategy in self.cls_dropping_strategies:
            ci = self.cls_index
            pool = [h[:, ci + 1:] if ci == 0 else torch.cat([h[:, :ci], h[:, ci + 1:]], dim=1)
                    for h in pool]  # drop [CLS]: [B, N, D]
        return pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)

    def encode(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
               layout: VisualLayout | None = None) -> Tensor:
        """pixel_values [U, 3, H, W] -> pre-projector features [U, N, D], one row per unit of
        ``layout`` (runs the whole tower once).

        Any forward hooks on the tower's modules (e.g. signal capture) fire during this call.
        """
        out = self.get_vision_tower(model)(pixel_values, output_hidden_states=True, return_dict=True)
        return self.select_features(out.hidden_states, layer, strategy)

    def pack(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
             layout: VisualLayout) -> tuple[list[Tensor], list[int]]:
        """A method's per-unit output -> per-image LLM tokens, NaN-padded to the unpruned count.

        ``projected`` [U, M, D_text] are the projected kept tokens (unit u's first ``counts[u]``
        rows valid, ``reduction.mask`` [U, M]); one unit per image here, so image i's tensor is
        [tokens_per_image[i], D_text] with its kept tokens first and NaN after. Returns the
        tensors and each image's kept count.
        """
        n_img, width = projected.shape[:2]
        per_image = layout.tokens_per_image[0]
        padded = projected.new_empty((n_img, per_image, projected.shape[-1]))  # [I, N, D_text]
        padded[:, :width] = projected
        padded[:, width:] = float("nan")
        if min(counts) < width:  # ragged batch: each image's rows past its own count are padding too
            padded[:, :width].masked_fill_(~reduction.mask[..., None], float("nan"))
        return list(padded), counts

    def encode_with_signals(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
                            layout: VisualLayout) -> tuple[Tensor, Any]:
        """``encode`` plus the importance signals the [CLS]-based methods read
        (``vision.VisionSignals``: cls_attn [U, N], keys [U, N, C]): here the [CLS] row of the last
        encoder layer's attention, from hooks on its q / k projections."""
        from .vision import capture_signals, signals_from_qk

        with capture_signals(self, model) as store:
            features = self.encode(model, pixel_values, layer, strategy, layout)
        return features, signals_from_qk(store["q_cls"], store["k"], self.cls_index)

    def pack_slots(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
                   layout: VisualLayout) -> tuple[list[Tensor], list[int], list[Tensor | None]]:
        """``pack`` plus each image's kept placeholder slots: None = its first ``counts[i]``
        (the kept tokens take the first placeholders), else [counts[i]] long row indices of its
        finite rows (``vision.image_token_slots``)."""
        per_image, counts = self.pack(model, projected, reduction, counts, layout)
        return per_image, counts, [None] * len(per_image)

    def prompt_positions(self, model: Any, kwargs: dict[str, Any]) -> Tensor | None:
        """The position ids of the unpruned prompt in the forward's ``kwargs``, in the forward's own
        form, for families whose survivors keep their positions (``compact_positions`` False);
        None: the model derives them."""
        return None

    def after_rewrite(self, model: Any, plan: Any, positions: Tensor | None = None) -> None:
        """Called once the vision stage rewrote a prefill (``vision.Plan``: what it deleted;
        ``positions``: the unpruned prompt's, in the forward's form, or None), for state the family
        keeps across calls (e.g. Qwen2-VL's ``rope_deltas``). Nothing here."""
        return None

    def project(self, model: Any, features: Tensor) -> Tensor:
        """Pre-projector features [B, M, D] -> LLM-space tokens [B, M, D_text]."""
        return self.get_projector(model)(features)

    def project_kept(self, model: Any, tokens: Tensor, layout: VisualLayout) -> Tensor:
        """A method's kept tokens [U, M, D] -> [U, M, D_text]. A family whose units carry other tower
        rows to the LLM (Video-LLaVA's frame [CLS]) projects them in the same call, so that keeping
        every token runs the projector on the stock shape."""
        return self.project(model, tokens)

    def image_output(self, per_image: list[Tensor]) -> Any:
        """Per-image token tensors [n_i, D_text] -> what ``image_features_method`` returns."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=list(per_image))

    def image_tokens(self, output: Any) -> list[Tensor] | None:
        """The per-image token tensors [n_i, D_text] held by an ``image_features_method`` output."""
        feats = getattr(output, "pooler_output", None)
        if feats is None:
            return None
        return list(feats)  # a list of [n_i, D] or a [I, n, D] tensor


_ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` known to ``get_adapter`` (one call per family module)."""
    if any(a.family == adapter.family for a in _ADAPTERS):
        raise ValueError(f"an adapter for family {adapter.family!r} is already registered")
    _ADAPTERS.append(adapter)
    return adapter


def adapters() -> list[ModelAdapter]:
    """Every registered adapter (imports the built-in family modules first)."""
    for mod in _ADAPTER_MODULES:
        importlib.import_module(mod)
    return list(_ADAPTERS)


def get_adapter(model: Any) -> ModelAdapter:
    """The adapter for ``model``'s family (a model, or its multimodal config);
    ``UnsupportedModelError`` names the supported ones."""
    known = adapters()
    for adapter in known:
        if adapter.matches(model):
            return adapter
    supported = "; ".join(f"{a.family} ({', '.join(a.model_classes)})" for a in known)
    from .compat import is_config

    what = f"config model_type {model.model_type!r}" if is_config(model) else type(model).__name__
    raise UnsupportedModelError(f"vlmprune does not support {what}; supported model families: "
                                f"{supported}")


def video_view(model: Any, processor: Any) -> Any:
    """The adapter view of ``model``'s video inputs (``modality_views`` entry of modality "video");
    ``ValueError`` saying why videos cannot be used: the family takes none, or ``processor`` has no
    video processor (transformers builds it only with torchvision). Callers prefix their context."""
    adapter = get_adapter(model)
    view = next((v for v in adapter.modality_views(model) if v.image_modality == "video"), None)
    if view is None:
        raise ValueError(f"the {adapter.family} family takes no videos")
    if getattr(processor, "video_processor", None) is None:
        raise ValueError("the model's processor has no video processor (transformers builds it only with "
                         "torchvision): install torchvision")
    return view
