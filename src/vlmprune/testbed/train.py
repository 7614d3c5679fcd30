"""Training recipe of the testbed LLaVA: vision tower, then projector + decoder (as LLaVA is built), then [CLS].

Stage 1 trains the CLIP vision tower from scratch on dense, synthetic supervision:
  * the [CLS] output (``pooler_output``) predicts which colour-shape pairs are present
    (multi-label) -- the LLM never reads [CLS], so this objective is what makes its attention
    meaningful for PruMerge-style methods;
  * the penultimate-layer patch features (the ones LLaVA feeds to the LLM) predict the colour,
    shape, "object centre here" and text character of each patch, and its normalised position.
Stage 2 freezes the vision tower and trains the projector and the Llama decoder on multi-turn
ShapesVQA conversations (several question-answer turns per image amortise the 576 visual tokens;
loss on answer tokens), after standardising the projector's input (``standardize_projector``) and
with a patch-naming term (``patch_word_targets``); docs/testbed.md explains both with the probes
that motivated them.
Stage 3 (``cls_steps``, 100 in the recipe) refines the [CLS] pathway: only the *last* vision
layer, the post-layernorm and the [CLS] head train, on the multi-label objective plus a term that
pulls the [CLS] attention PruMerge reads onto object/text patches (``cls_loss``). LLaVA reads
``hidden_states[-2]``, the input of that last layer, so this stage cannot change what the LLM sees
(it is independent of stage 2). No stage-1 loss targets that attention, and across stage 1 its
share on object/text patches wanders (0.62 at step 1100, 0.30 at step 2000 in the shipped run);
100 stage-3 steps bring it to 0.995 (docs/testbed.md).

All data are generated on the fly from step-indexed seeds, so a run is reproducible from its seed
and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods.prumerge import cls_attention as cls_attention_from_qk
from .questions import FAMILIES, POSITION_QUESTION, ask, format_prompt
from .scenes import CODE_ALPHABET, COLOR_NAMES, CORNERS, GRID, PLURALS, SHAPES, make_scene, patch_labels, split_seed


@dataclass
class TrainConfig:
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



#: the words guide's add-ons, all off: what a config with ``guide_rows="answer"`` (the tests' tiny
#: runs, ``diagnose.attention_share``) must also say, since validation ties each to the words guide
WORDS_GUIDE_ADDONS_OFF = dict(guide_count=False, guide_read_stop=False, guide_read_prev=False, guide_position=False)


class VisionHeads(nn.Module):
    """Auxiliary heads used only in stage 1 (not part of the saved LLaVA model)."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = nn.Linear(width, len(SHAPES) * len(COLOR_NAMES))
        self.color = nn.Linear(width, 1 + len(COLOR_NAMES))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.center = nn.Linear(width, 1)
        self.char = nn.Linear(width, 1 + len(CODE_ALPHABET))
        self.pos = nn.Linear(width, 2)


@torch.no_grad()
def sincos_positions(vision_tower) -> None:
    """Set a CLIP vision tower's position embeddings to a 2-D sine-cosine table ([CLS] row: zeros).

    A data-independent init (as MAE uses, there frozen; here it stays trainable) that gives the
    from-scratch tower a notion of which patches are neighbours from step 0: half the channels
    encode the patch row, half the column, each with sines and cosines at geometric frequencies.
    """
    emb = vision_tower.embeddings.position_embedding.weight  # [1 + G*G, C]
    n, width = emb.shape[0] - 1, emb.shape[1]
    grid = math.isqrt(n)
    if grid * grid != n or width % 4:
        raise ValueError(f"sincos_positions needs a square patch grid and width divisible by 4, got {n} patches, width {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    idx = torch.arange(n)
    parts = []
    for coord in (idx // grid, idx % grid):
        angles = coord[:, None].float() * freqs[None]
        parts += [angles.sin(), angles.cos()]
    emb[0] = 0
    emb[1:] = torch.cat(parts, 1)


@torch.no_grad()
def mimetic_attention(vision_tower, seed: int = 0, self_logit: float = 4.0) -> None:
    """Initialise every vision layer's key projection equal to its query projection (biases zero).

    The query-key part of "mimetic initialisation" (Trockman & Kolter, 2023): with W_k = W_q each
    head scores a token pair by a random projection of their similarity, so from step 0 a patch
    attends mostly to itself and to similar patches -- its neighbours (through the position
    embeddings) and patches of the same colour -- instead of uniformly over all 577 tokens. The
    scale makes a token's expected logit against itself ``self_logit``.
    """
    gen = torch.Generator().manual_seed(seed + 4242)
    for layer in vision_tower.encoder.layers:
        attn = layer.self_attn
        width = attn.q_proj.weight.shape[1]
        std = (self_logit / (width * attn.head_dim ** 0.5)) ** 0.5
        w = torch.randn(attn.q_proj.weight.shape, generator=gen) * std
        attn.q_proj.weight.copy_(w)
        attn.k_proj.weight.copy_(w)
        attn.q_proj.bias.zero_()
        attn.k_proj.bias.zero_()


def _pixel_values(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _vision_batch(cfg: TrainConfig, step: int, processor, batch: int | None = None):
    batch = batch or cfg.vision_batch
    scenes = []
    for i in range(batch):
        seed = split_seed("train", (cfg.seed * 7919 + step * batch + i) % 400_000_000)
        rnd = random.Random(seed)
        text = rnd.random() < cfg.text_prob
        dense = cfg.vision_dense and rnd.random() < cfg.vision_dense
        scenes.append(make_scene(seed, text=text, n_objects=rnd.randint(12, 24) if dense else None))
    labels = [patch_labels(s) for s in scenes]
    stack = lambda name: torch.as_tensor(np.stack([getattr(lab, name) for lab in labels]))  # noqa: E731
    targets = {k: stack(k) for k in ("color", "shape", "center", "char", "present", "object_or_text")}
    return _pixel_values(processor, [s.image for s in scenes]), targets


def _patch_ce(logits: torch.Tensor, target: torch.Tensor, object_only: bool) -> torch.Tensor:
    """Cross-entropy over all patches, plus (``object_only``) the mean over labelled patches (target > 0).

    About 5% of patches show an object or text; averaged over all 576, a patch-level loss is
    dominated by the trivial background class (the v0 tower's shape loss reached 0.08 overall with
    22% accuracy on object patches, chance 17%), so the second term gives object patches their own
    weight.
    """
    flat, t = logits.flatten(0, 1), target.flatten()
    loss = F.cross_entropy(flat, t)
    if object_only:
        labelled = t > 0
        loss = loss + (F.cross_entropy(flat[labelled], t[labelled]) if labelled.any() else flat.sum() * 0)
    return loss


def vision_loss(vision_tower, heads: VisionHeads, pixel_values, targets,
                object_loss: bool = False) -> tuple[torch.Tensor, dict]:
    out = vision_tower(pixel_values, output_hidden_states=True)
    patches = out.hidden_states[-2][:, 1:]  # [B, 576, C]: what LLaVA feeds the projector
    n = patches.shape[1]
    grid = int(math.isqrt(n))
    rows = torch.arange(n) // grid
    cols = torch.arange(n) % grid
    pos_t = torch.stack([rows, cols], -1).float().div(grid - 1).expand(patches.shape[0], -1, -1)
    losses = {
        "cls": F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"]),
        "color": _patch_ce(heads.color(patches), targets["color"], object_loss),
        "shape": _patch_ce(heads.shape(patches), targets["shape"], object_loss),
        "center": F.binary_cross_entropy_with_logits(heads.center(patches).squeeze(-1), targets["center"].float(),
                                                     pos_weight=torch.tensor(20.0)),
        "char": _patch_ce(heads.char(patches), targets["char"], object_loss),
        "pos": F.mse_loss(heads.pos(patches), pos_t),
    }
    total = 4 * losses["cls"] + losses["color"] + losses["shape"] + losses["center"] + losses["char"] + losses["pos"]
    return total, {k: float(v.detach()) for k, v in losses.items()}


def cls_attention(vision_tower, hidden: torch.Tensor) -> torch.Tensor:
    """[B, N] [CLS] attention over patches as PruMerge reads it (prumerge.md section 1).

    ``hidden`` is the input of the last vision layer (``hidden_states[-2]``); one softmax over the
    concatenated-head logits of the [CLS] query against all keys, [CLS] column dropped.
    """
    layer = vision_tower.encoder.layers[-1]
    x = layer.layer_norm1(hidden)
    q = layer.self_attn.q_proj(x[:, :1])  # [B, 1, C]: only the [CLS] query is needed
    k = layer.self_attn.k_proj(x)  # [B, N+1, C]
    return cls_attention_from_qk(q.expand_as(k), k)  # the method's own formula (reads row 0 of q)


def cls_loss(vision_tower, heads: VisionHeads, pixel_values, targets, attention_weight: float) -> torch.Tensor:
    """Stage 3: multi-label colour-shape prediction from [CLS], guided to look at object patches.

    The guidance term is ``-log`` of the [CLS] attention mass (PruMerge's formula) on patches that
    show an object or text; without it the [CLS] query stays near uniform over the 576 patches and
    the multi-label loss does not leave its prior within the training budget.
    """
    out = vision_tower(pixel_values, output_hidden_states=True)
    bce = F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"])
    if attention_weight == 0:
        return bce
    a = cls_attention(vision_tower, out.hidden_states[-2])
    mass = (a * targets["object_or_text"].float()).sum(-1) / a.sum(-1)
    return bce + attention_weight * -(mass + 1e-6).log().mean()


def conversation(scene, rnd: random.Random, turns: int,
                 families: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Question-answer turns about one scene, every supported family at least once when possible."""
    qa = []
    if families:
        fams = [rnd.choice(families) for _ in range(4 * turns)]
    else:
        fams = list(FAMILIES) + [rnd.choice(("exist", "count", "position", "color", "shape")) for _ in range(turns)]
    for fam in fams:
        q = ask(scene, fam, rnd)
        if q is not None and all(q.question != prev for prev, _ in qa):
            qa.append((q.question, q.answer))
        if len(qa) >= turns:
            break
    rnd.shuffle(qa)
    return qa


def _prompt_ids(tokenizer, question: str, image_token_id: int, num_image_tokens: int) -> tuple[list[int], int]:
    """Token ids of the single-turn evaluation prompt with the image expanded, and the last image token's index."""
    prompt = format_prompt(question).replace("<image>", "<image>" * num_image_tokens)
    ids = list(tokenizer(prompt)["input_ids"])
    img = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(img) != num_image_tokens:
        raise ValueError(f"the prompt tokenised to {len(img)} image tokens, expected {num_image_tokens}; does the "
                         f"tokenizer know '<image>' as token {image_token_id}?")
    return ids, img[-1]


def encode_turns(tokenizer, qa: list[tuple[str, str]], image_token_id: int,
                 num_image_tokens: int = 576) -> tuple[list[int], list[int], list[bool]]:
    """Token ids, labels (-100 except answers and their </s>) and instruction mask of a conversation.

    The first turn is tokenised exactly as the evaluation prompt (the testbed's template with the
    image placeholder expanded to ``num_image_tokens``); the instruction rows are that turn's
    tokens after the last image token (the question and "ASSISTANT:"), never an answer.
    """
    ids, last_image = _prompt_ids(tokenizer, qa[0][0], image_token_id, num_image_tokens)
    instruction = [i > last_image for i in range(len(ids))]
    labels = [-100] * len(ids)
    for k, (q, a) in enumerate(qa):
        if k > 0:
            turn = tokenizer(f"USER: {q} Answer with one word. ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += turn
            labels += [-100] * len(turn)
            instruction += [False] * len(turn)
        ans = list(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids += ans
        labels += ans
        instruction += [False] * len(ans)
    return ids, labels, instruction


def encode_independent_turns(tokenizer, qa: list[tuple[str, str]], image_token_id: int,
                             num_image_tokens: int = 576) -> dict[str, list[int]]:
    """One shared image prefix followed by turns that each see only the prefix and themselves.

    Every turn is tokenised exactly as its own single-turn evaluation prompt; the tokens up to and
    including the last image token are shared (checked), the rest of each prompt plus the answer
    and ``</s>`` form the turn. Returned per token: ``input_ids``, ``labels`` (-100 except
    answers), ``position_ids`` (each turn continues from the prefix, as in evaluation) and
    ``segment`` (0 for the prefix, k for turn k) from which ``segment_attention_mask`` builds the
    mask. So one forward pass trains ``len(qa)`` single-turn questions about one image, with no
    answer of one turn visible to another.
    """
    prefix = None
    ids, labels, positions, segment = [], [], [], []
    for k, (q, a) in enumerate(qa, start=1):
        full, last_image = _prompt_ids(tokenizer, q, image_token_id, num_image_tokens)
        head, tail = full[: last_image + 1], full[last_image + 1:]
        if prefix is None:
            prefix = head
            ids += head
            labels += [-100] * len(head)
            positions += list(range(len(head)))
            segment += [0] * len(head)
        elif head != prefix:
            raise ValueError("the image prefix of two turns tokenised differently")
        ans = list(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        turn = tail + ans
        ids += turn
        labels += [-100] * len(tail) + ans
        positions += list(range(len(prefix), len(prefix) + len(turn)))
        segment += [k] * len(turn)
    return dict(input_ids=ids, labels=labels, position_ids=positions, segment=segment)


def segment_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids (0 prefix, k >= 1 turn k, -1 padding) -> [B, 1, L, L] boolean mask.

    Query i may see key j iff j <= i and (j is in the prefix or in i's own segment); a padding row
    sees the prefix and itself, so no row is empty.
    """
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((k == 0) | (q == k))
    allowed |= torch.eye(L, dtype=torch.bool)
    return allowed[:, None]


def encode_conversation(processor, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a multi-turn conversation about one 576-token image (see ``encode_turns``)."""
    tok = processor.tokenizer
    ids, labels, _ = encode_turns(tok, qa, tok.convert_tokens_to_ids("<image>"))
    return ids, labels


def _llm_batch(cfg: TrainConfig, step: int, processor):
    tok = processor.tokenizer
    images, seqs, scenes, conversations = [], [], [], []
    for i in range(cfg.llm_batch):
        seed = split_seed("train", (400_000_000 + cfg.seed * 7919 + step * cfg.llm_batch + i) % 800_000_000)
        rnd = random.Random(seed)
        n_objects = rnd.randint(1, cfg.max_objects) if cfg.max_objects else None
        scene = make_scene(seed, text=rnd.random() < cfg.text_prob, n_objects=n_objects)
        images.append(scene.image)
        scenes.append(scene)
        qa = conversation(scene, rnd, cfg.turns, cfg.families)
        if not qa:  # e.g. only "read" asked of a scene without text: fall back to an existence question
            qa = conversation(scene, rnd, 1, ("exist",))
        conversations.append(qa)
        if cfg.independent_turns:
            seqs.append(encode_independent_turns(tok, qa, tok.convert_tokens_to_ids("<image>")))
        else:
            seqs.append(encode_conversation(processor, qa))
    pixel_values = _pixel_values(processor, images)
    if cfg.independent_turns:
        width = max(len(s["input_ids"]) for s in seqs)
        fills = {"input_ids": tok.pad_token_id, "labels": -100, "position_ids": 0, "segment": -1}
        out = {}
        for key, fill in fills.items():
            out[key] = torch.full((len(seqs), width), fill)
            for b, s in enumerate(seqs):
                out[key][b, : len(s[key])] = torch.tensor(s[key])
        mask = segment_attention_mask(out.pop("segment"))
        allowed = mask[:, 0]
        batch = dict(**out, attention_mask=mask, pixel_values=pixel_values)
    else:
        width = max(len(s[0]) for s in seqs)
        input_ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, (ids, lab) in enumerate(seqs):  # right padding for training
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            mask[b, : len(ids)] = 1
        allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        batch = dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixel_values)
    share = background_keep(cfg, step)
    if cfg.patch_words or cfg.guide_weight or cfg.ground_words or share < 1:
        labs = [patch_labels(sc) for sc in scenes]
        if share < 1:
            batch["keep_image"] = torch.stack([
                background_sample(torch.as_tensor(lab.object_or_text), share, cfg.seed * 104729 + step * cfg.llm_batch + b)
                for b, lab in enumerate(labs)])
        image = batch["input_ids"] == tok.convert_tokens_to_ids("<image>")
        words = _patch_word_ids(tok)
        if cfg.patch_words:
            batch["patch_words"] = _scatter_image(
                image, [patch_word_ids(lab, words, cfg.patch_position) for lab in labs], -100)
        if cfg.ground_words:
            batch["ground_words"] = torch.stack([grounding_word_ids(lab, words) for lab in labs])
        if cfg.guide_weight:
            rows = answer_start_rows(batch["labels"])
            layer_rows = None
            if cfg.guide_rows.startswith("words"):
                rows, targets = word_guide_targets(batch["input_ids"], batch["labels"], image, labs, tok)
                if cfg.guide_count:
                    uniform = count_guide_targets(batch["input_ids"], image, scenes, tok, rows, targets)
                if cfg.guide_rows == "words+read":
                    if cfg.guide_read_prev:  # image rows, guided with the word rows (on the word layers)
                        code_prev_targets(image, scenes, rows, targets)
                    word_rows = rows.clone()
                    read_guide_targets(batch["input_ids"], batch["labels"], image, scenes, tok, rows, targets,
                                       stop=cfg.guide_read_stop)
                    if cfg.guide_read_layers is not None:  # each kind of row on its own layers
                        read_rows = rows & ~word_rows
                        layer_rows = {}
                        for layers, r in ((cfg.guide_layers, word_rows), (cfg.guide_read_layers, read_rows)):
                            for layer in layers:
                                layer_rows[layer] = layer_rows.get(layer, torch.zeros_like(r)) | r
                if cfg.guide_position:
                    answer_rows, pos_words, pos_targets = position_guide_targets(
                        batch["input_ids"], batch["labels"], image, conversations, tok, cfg.guide_heads)
                    if layer_rows is None:
                        layer_rows = {layer: rows.clone() for layer in cfg.guide_layers}
                    fetch = cfg.guide_position_layers[0]  # the shape words re-fetch their patches here
                    layer_rows[fetch] = layer_rows.get(fetch, torch.zeros_like(rows)) | (pos_words & rows)
                    position = dict(rows=answer_rows, targets=pos_targets, layer=cfg.guide_position_layers[1])
            elif cfg.guide_focus:  # [B, L, L]: answer row r of turn k -> the patches turn k's question names
                targets = torch.zeros(*rows.shape, rows.shape[1], dtype=torch.bool)
                for b, (lab, qa) in enumerate(zip(labs, conversations)):
                    keys = image[b].nonzero()[:, 0]
                    for row, (question, _) in zip(rows[b].nonzero()[:, 0], qa):
                        targets[b, row, keys] = torch.as_tensor(question_patches(question, lab))
                rows &= targets.any(-1)  # a question naming nothing present (a "no" / "0" answer) is not guided
            else:
                targets = _scatter_image(image, [torch.as_tensor(lab.object_or_text) for lab in labs], False)
            batch["guide"] = dict(rows=rows, targets=targets, allowed=allowed)
            if layer_rows is not None:
                batch["guide"]["layer_rows"] = layer_rows
            if cfg.guide_count:
                batch["guide"]["uniform"] = uniform
            if cfg.guide_position:
                batch["guide"]["extra"] = [position]
    return batch


def _single_token(tok, text: str) -> int | None:
    """The id of ``text`` when the tokenizer spells it as exactly one token, else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@functools.lru_cache(maxsize=4)
def _naming_tokens(tok) -> dict[int, tuple[str, int]]:
    """Token id -> ("color" | "shape", 1-based label index) for the colour words, shape words and plurals."""
    table = {}
    for kind, names in (("color", COLOR_NAMES), ("shape", SHAPES), ("shape", [PLURALS[s] for s in SHAPES])):
        for i, name in enumerate(names, start=1):
            tid = _single_token(tok, " " + name)
            if tid is not None:
                table[tid] = (kind, i)
    return table


def word_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, labs, tok):
    """Rows [B, L] and targets [B, L, L] of the word-grounding guide (``guide_rows="words"``).

    Every question token (not an answer, not an image token) that names a colour or a shape
    (" red", " triangle", " triangles") is guided to the image patches showing that colour or
    shape; a word naming nothing in the image is not guided. One hop of content matching -- word
    to patches -- that the answer row can then read from the word's position, instead of a
    retrieval the answer row must learn to ask for by itself.
    """
    table = _naming_tokens(tok)
    B, L = input_ids.shape
    rows = torch.zeros(B, L, dtype=torch.bool)
    targets = torch.zeros(B, L, L, dtype=torch.bool)
    for b, lab in enumerate(labs):
        keys = image[b].nonzero()[:, 0]
        maps = {"color": torch.as_tensor(lab.color), "shape": torch.as_tensor(lab.shape)}
        for t in ((labels[b] == -100) & ~image[b]).nonzero()[:, 0].tolist():
            hit = table.get(int(input_ids[b, t]))
            if hit is not None:
                patches = maps[hit[0]] == hit[1]
                if patches.any():
                    targets[b, t, keys] = patches
                    rows[b, t] = True
    return rows, targets


@functools.lru_cache(maxsize=4)
def _plural_tokens(tok) -> dict[int, str]:
    """Token id -> shape for the plural shape words that are one token (" circles", ...)."""
    ids = {shape: _single_token(tok, " " + PLURALS[shape]) for shape in SHAPES}
    return {tid: shape for shape, tid in ids.items() if tid is not None}


def count_guide_targets(input_ids: torch.Tensor, image: torch.Tensor, scenes, tok,
                        rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn the plural-word rows of a words guide into counting rows (in place); returns them [B, L].

    The plural in "How many circles are there?" is re-targeted to the first token of the sequence
    (an attention sink) plus the centre patch of every circle, and the returned rows are trained
    towards a *uniform* distribution over those keys (``AttentionGuide.loss``'s ``uniform``): the
    sink then gets 1 / (n + 1) of the attention, so the row's output carries the count n in the
    weight of the sink's value -- the word guide's own target (all circle patches, any share among
    them) carries none. A plural naming an absent shape points at the sink alone (answer 0).
    """
    plurals = _plural_tokens(tok)
    uniform = torch.zeros_like(rows)
    for b, scene in enumerate(scenes):
        keys = image[b].nonzero()[:, 0]
        for t in (~image[b]).nonzero()[:, 0].tolist():
            shape = plurals.get(int(input_ids[b, t]))
            if shape is None or t == 0:
                continue
            centres = sorted({r * GRID + c for r, c in (o.center_patch for o in scene.objects if o.shape == shape)})
            targets[b, t] = False
            targets[b, t, 0] = True
            if centres:
                targets[b, t, keys[centres]] = True
            rows[b, t] = True
            uniform[b, t] = True
    return uniform


def read_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, scenes, tok,
                       rows: torch.Tensor, targets: torch.Tensor, *, stop: bool = False) -> None:
    """Add the reading rows to a guide's ``rows`` [B, L] / ``targets`` [B, L, L] (in place).

    For each answer to "What is written in the image?" (an answer span equal to the scene's code),
    the row that predicts each answer token is guided to the patch(es) of the character(s) that
    token spells -- one character per patch cell, left to right -- so reading becomes "look at the
    next cell", a relative-position pattern, instead of a search the answer rows must discover.

    ``stop=True`` also guides the row that predicts the end of the answer (the token after the
    code) to the cell right after the last character, when the grid has one: the model then
    decides to stop by looking at an empty cell, instead of stopping after a typical number of
    tokens (v11 at step 1050 read every 3-character code and no 4-character one, stopping after
    three tokens).
    """
    for b, scene in enumerate(scenes):
        if scene.text is None:
            continue
        code = scene.text.code.lower()
        keys = image[b].nonzero()[:, 0]
        answer = (labels[b] != -100).tolist()
        t = 0
        while t < len(answer):
            if not answer[t]:
                t += 1
                continue
            end = t
            while end < len(answer) and answer[end]:
                end += 1
            span = input_ids[b, t:end].tolist()
            if span and span[-1] == tok.eos_token_id:
                span = span[:-1]
            pieces = [tok.decode([i]) for i in span]
            if pieces and "".join(pieces).strip() == code:
                done = 0
                for j, piece in enumerate(pieces):
                    n = len(piece.strip())
                    cells = [scene.text.row * GRID + scene.text.col + c for c in range(done, done + n)]
                    done += n
                    if cells:
                        rows[b, t + j - 1] = True
                        targets[b, t + j - 1, keys[cells]] = True
                after = scene.text.col + len(code)  # the cell right after the code
                if stop and end - t > len(pieces) and after < GRID:  # the answer has an end token after the code
                    stop_row = t + len(pieces) - 1  # the row that predicts the end token
                    rows[b, stop_row] = True
                    targets[b, stop_row, keys[scene.text.row * GRID + after]] = True
            t = end


def code_prev_targets(image: torch.Tensor, scenes, rows: torch.Tensor, targets: torch.Tensor) -> None:
    """Add the previous-cell rows of a read guide (``guide_read_prev``) to ``rows`` / ``targets`` (in place).

    The image token of each code cell after the first is guided to the cell on its left (the image
    token just before it): a previous-token head over the code, so that cell ``k`` carries which
    character precedes it. Reading then becomes what small decoders learn readily for copying text
    (an induction pattern): the row that has just emitted character ``k - 1`` looks for the cell
    whose left neighbour shows that character, and emits that cell's character. v11 and v13
    read 3-character codes but stop 4-character ones after three characters or skip a cell
    ("zdng" -> "zdn", "mnqu" -> "mnu"): the read rows find characters by where the code is rather
    than step through it.
    The first cell is left out: its left neighbour is background, which background dropout may drop.
    """
    for b, scene in enumerate(scenes):
        if scene.text is None:
            continue
        keys = image[b].nonzero()[:, 0]
        first = scene.text.row * GRID + scene.text.col
        for cell in range(first + 1, first + len(scene.text.code)):
            rows[b, keys[cell]] = True
            targets[b, keys[cell], keys[cell - 1]] = True


def answer_start_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the rows that predict each answer's first token (a prompt token followed by a labelled one)."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = (labels[:, :-1] == -100) & (labels[:, 1:] != -100)
    return rows


def position_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                           conversations: list[list[tuple[str, str]]], tok, heads: int):
    """Rows and per-head targets of the position guide (``guide_position``).

    Returns ``(answer_rows [B, L], word_rows [B, L], targets [B, heads, L, L])``. For every
    position question ("Which corner is the star in?", "Is the star left of the square?") the row
    predicting its answer is guided, guided head ``h`` towards the ``h % n``-th of the question's
    ``n`` shape words (the corner question's one word on every head; a relation's first word on
    head 0, second on head 1), and those shape-word tokens are returned as ``word_rows``.

    Why: linear probes of v11 (``python -m vlmprune.testbed.diagnose MODEL corner``) found an
    object's corner readable at its patches (0.80 at the decoder input, 0.97-1.00 from layer 3)
    and partly at the question's shape word (at most 0.68, fetched by the word guide on layers
    0-1), but at most 0.41 at the answer row -- the last hop, answer row to word, was never learnt.
    One head per named object keeps the two objects of a relation apart, so the layers above see
    "where is a" and "where is b" side by side and only have to compare them.
    """
    table = _naming_tokens(tok)
    B, L = input_ids.shape
    answer_rows = torch.zeros(B, L, dtype=torch.bool)
    word_rows = torch.zeros(B, L, dtype=torch.bool)
    targets = torch.zeros(B, heads, L, L, dtype=torch.bool)
    starts = answer_start_rows(labels)
    for b, qa in enumerate(conversations):
        begin = 0
        for row, (question, _) in zip(starts[b].nonzero()[:, 0].tolist(), qa):
            span = range(begin, row + 1)
            begin = row + 1
            if not POSITION_QUESTION.match(question):
                continue
            words = [t for t in span if labels[b, t] == -100 and not image[b, t]
                     and table.get(int(input_ids[b, t]), ("",))[0] == "shape"]
            if not words:
                continue
            answer_rows[b, row] = True
            word_rows[b, words] = True
            for h in range(heads):
                targets[b, h, row, words[h % len(words)]] = True
    return answer_rows, word_rows, targets


def background_keep(cfg: TrainConfig, step: int) -> float:
    """Share of background image tokens the decoder sees at stage-2 ``step`` (``bg_keep`` ramped to 1).

    ``bg_keep`` until the fraction ``bg_ramp[0]`` of stage 2, linearly up to 1 at ``bg_ramp[1]``,
    then 1 (every image token, as at evaluation).
    """
    if cfg.bg_keep >= 1:
        return 1.0
    start, end = cfg.bg_ramp
    frac = step / max(1, cfg.llm_steps)
    if frac >= end:
        return 1.0
    t = 0.0 if frac <= start else (frac - start) / (end - start)
    return cfg.bg_keep + (1 - cfg.bg_keep) * t


def background_sample(foreground: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """[N] bool keep mask: every foreground patch plus round(share * #background) random background ones."""
    background = (~foreground).nonzero()[:, 0]
    n = round(share * len(background))
    picked = background[torch.randperm(len(background), generator=torch.Generator().manual_seed(seed))[:n]]
    return foreground.clone().index_fill_(0, picked, True)


def sparse_image_batch(model, batch: dict, keep: torch.Tensor, extra: torch.Tensor | None = None,
                       guide: dict | None = None):
    """A stage-2 batch with only the kept image tokens, fed as ``inputs_embeds`` with original positions.

    ``batch`` holds right-padded ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` with
    every image expanded to N placeholders; ``keep`` [B, N] says which patches each sample keeps.
    Returns ``(batch', extra')``: ``inputs_embeds`` with the dropped image tokens taken out (the
    rest in order, right-padded), their original ``position_ids`` (so RoPE sees the full image's
    geometry, as under pruning), mask and labels gathered alike; ``extra`` (a [B, L] per-token
    target such as the patch words) gathered the same way, and ``guide`` (the attention-guide
    rows / targets, with ``allowed`` rebuilt for the new mask) when given. With every patch kept,
    the model's output equals the ordinary forward's (tested).
    """
    cfg = model.config
    ids = batch["input_ids"]
    image = ids == cfg.image_token_id
    feats = model.model.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    feats = torch.stack(list(feats))  # [B, N, D]
    embeds = model.get_input_embeddings()(ids.masked_fill(image, 0))
    embeds = embeds.masked_scatter(image[..., None], feats.to(embeds.dtype))
    seq_keep = ~image
    seq_keep[image] = keep.reshape(-1)  # image positions in row-major order = patches 0..N-1 of each sample
    seq_keep &= batch["attention_mask"].bool()
    counts = seq_keep.sum(1)
    width = int(counts.max())
    order = torch.argsort((~seq_keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions, in order
    valid = torch.arange(width)[None, :] < counts[:, None]

    def take(x, fill):
        return torch.where(valid, x.gather(1, order), fill)

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = dict(inputs_embeds=embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])),
               attention_mask=valid.long(), position_ids=take(positions, 0), labels=take(batch["labels"], -100))
    def take_pairs(t):  # [B, *, L, L] (row, key) targets -> [B, *, width, width]
        lead = t.shape[1:-2]
        t = t.reshape(t.shape[0], -1, *t.shape[-2:])
        H = t.shape[1]
        t = t.gather(2, order[:, None, :, None].expand(-1, H, -1, t.shape[-1]))
        t = t.gather(3, order[:, None, None, :].expand(-1, H, width, -1)) & valid[:, None, None, :]
        return t.reshape(t.shape[0], *lead, width, width)

    if guide is not None:
        targets = guide["targets"]
        targets = take(targets, False) if targets.dim() == 2 else take_pairs(targets)
        allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :]
        gathered = dict(rows=take(guide["rows"], False), targets=targets, allowed=allowed)
        if "layer_rows" in guide:
            gathered["layer_rows"] = {layer: take(r, False) for layer, r in guide["layer_rows"].items()}
        if "uniform" in guide:
            gathered["uniform"] = take(guide["uniform"], False)
        if "extra" in guide:  # per-head targets [B, H, L, L]
            gathered["extra"] = [dict(group, rows=take(group["rows"], False), targets=take_pairs(group["targets"]))
                                 for group in guide["extra"]]
        guide = gathered
    return out, (None if extra is None else take(extra, -100)), guide


def question_patches(question: str, lab) -> np.ndarray:
    """[576] bool: the patches a ShapesVQA question is about (the ``guide_focus`` target).

    Object patches whose colour or shape (singular or plural) the question names; for the reading
    question, the code's patches. ("Is there a red star?" -> red patches and star patches;
    "How many circles are there?" -> circle patches.)
    """
    if question.startswith("What is written"):
        return lab.char > 0
    words = set(re.findall(r"[a-z]+", question.lower()))
    colors = [i + 1 for i, c in enumerate(COLOR_NAMES) if c in words]
    shapes = [i + 1 for i, s in enumerate(SHAPES) if s in words or PLURALS[s] in words]
    return np.isin(lab.color, colors) | np.isin(lab.shape, shapes)


def _scatter_image(image: torch.Tensor, per_patch: list[torch.Tensor], fill) -> torch.Tensor:
    """[B, L] tensor holding sample b's ``per_patch[b]`` at its image-token positions, ``fill`` elsewhere."""
    out = torch.full(image.shape, fill, dtype=per_patch[0].dtype)
    for b, values in enumerate(per_patch):
        out[b, image[b].nonzero()[:, 0]] = values
    return out


@functools.lru_cache(maxsize=4)
def _patch_word_ids(tok) -> dict[str, torch.Tensor]:
    """Token id tables (index 0 = none -> -100) of the colour words, shape words and code characters.

    Cached per tokenizer (read-only tensors: callers index them, never write).
    """
    def tid(text):
        t = _single_token(tok, text)
        return -100 if t is None else t

    table = lambda words: torch.tensor([-100] + [tid(w) for w in words])  # noqa: E731
    return {"color": table([" " + c for c in COLOR_NAMES]), "shape": table([" " + s for s in SHAPES]),
            "char": table(list(CODE_ALPHABET)), "corner": table([" " + c for c in CORNERS])}


def patch_word_ids(lab, words: dict[str, torch.Tensor], position: bool = False) -> torch.Tensor:
    """[576] token ids naming each patch of ``lab`` (a ``PatchLabels``); see ``patch_word_targets``.

    ``position``: object patches cycle colour / shape / corner word by ``(row + col) % 3`` instead.
    """
    color, shape, char = (torch.as_tensor(getattr(lab, k)) for k in ("color", "shape", "char"))
    if position:
        cell = torch.arange(len(color))
        phase = (cell // GRID + cell % GRID) % 3
        ids = torch.where(phase == 0, words["color"][color], words["shape"][shape])
        ids = torch.where(phase == 2, words["corner"][torch.as_tensor(lab.corner)], ids)
    else:
        even = torch.arange(len(color)) % 2 == 0
        ids = torch.where(even, words["color"][color], words["shape"][shape])  # -100 where no object
    return torch.where(char > 0, words["char"][char], ids)


def grounding_word_ids(lab, words: dict[str, torch.Tensor]) -> torch.Tensor:
    """[576, 2] token ids whose embeddings describe each patch of ``lab`` (-100 = none).

    Object patches: (colour word, shape word); text patches: (character, -100); background: both -100.
    """
    color, shape, char = (torch.as_tensor(getattr(lab, k)) for k in ("color", "shape", "char"))
    ids = torch.stack([words["color"][color], words["shape"][shape]], -1)
    text = torch.stack([words["char"][char], torch.full_like(char, -100)], -1)
    return torch.where((char > 0)[:, None], text, ids)


def grounding_loss(image_features: torch.Tensor, word_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between projected patches and the summed embeddings of the words naming them.

    ``image_features`` [B, N, D] is the projector's output, ``word_ids`` [B, N, 2]
    (``grounding_word_ids``), ``embeddings`` the decoder's input embedding matrix (used as a fixed
    target: detached, so the loss moves the projector only). Patches with no word are left out.
    The point: a question's words ("triangle") and the patches that show them start out pointing
    the same way in the decoder's input space, so finding the patch a question names is the
    token-matching that small decoders learn fast (induction-style copying), not a new
    cross-modal map learnt from a few answer tokens per image.
    """
    valid = word_ids >= 0
    target = (embeddings.detach()[word_ids.clamp(min=0)] * valid[..., None]).sum(-2)  # [B, N, D]
    labelled = valid.any(-1)
    if not labelled.any():
        return image_features.sum() * 0
    cos = F.cosine_similarity(image_features[labelled].float(), target[labelled].float(), dim=-1)
    return (1 - cos).mean()


def patch_word_targets(scene, tok, position: bool = False) -> torch.Tensor:
    """[576] token ids naming each patch's content (-100 for background), for the patch-naming auxiliary.

    Object patches alternate (in raster order) between their colour word and their shape word
    (" red", " circle": one token each in the testbed vocabulary); with ``position`` they cycle
    (by ``(row + col) % 3``) between colour, shape and the corner word of the object's centre
    (" topleft", ...: the position family's answers), so the image tokens carry where an object is
    as well as what it is (the decoder's values carry no position of their own: rotary embeddings
    act on queries and keys only). Text patches name their character
    (the character's own token). The decoder's output at an image token is trained to predict that
    word through the same ``lm_head`` -- as logit-lens studies find real LLaVA's visual tokens do --
    so the map from visual features to answer words is learnt densely, from every object patch,
    instead of only through the few answer tokens of each conversation.
    """
    return patch_word_ids(patch_labels(scene), _patch_word_ids(tok), position)


@torch.no_grad()
def calibration_features(model, processor, cfg: TrainConfig, n_images: int = 64) -> torch.Tensor:
    """[n_images * 576, C] projector inputs (the vision feature layer's patch rows) of fixed training scenes."""
    vision = model.model.vision_tower
    layer = model.config.vision_feature_layer
    feats = []
    for start in range(0, n_images, 16):
        scenes = [make_scene(split_seed("train", 300_000_000 + cfg.seed * 7919 + start + i), text=i % 2 == 0)
                  for i in range(min(16, n_images - start))]
        hs = vision(_pixel_values(processor, [sc.image for sc in scenes]), output_hidden_states=True).hidden_states
        feats.append(hs[layer][:, 1:].flatten(0, 1))
    return torch.cat(feats)


@torch.no_grad()
def standardize_projector(model, processor, cfg: TrainConfig, n_images: int = 64) -> dict:
    """Data-dependent initialisation of the projector's first layer (stage 2 starts with it).

    The frozen vision tower's penultimate patch features carry a large component common to all
    patches (per-patch norm ~45 with ~1.6 per-dimension spread in the v0 tower), so with the default
    init every projected image token has a norm ~50x a text embedding and all image tokens look
    alike after the decoder's RMSNorm; the from-scratch decoder then does not learn to read the image
    in the step budget. Folding the features' mean and per-dimension std over ``n_images`` training
    scenes into ``linear_1`` (``W' = W / std``, ``b' = b - W' mean``) feeds the projector
    standardised features; the module stays a stock LLaVA projector.
    """
    f = calibration_features(model, processor, cfg, n_images)
    mean, std = f.mean(0), f.std(0).clamp_min(1e-4)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(std)
    lin.bias.sub_(lin.weight @ mean)
    return {"feature_norm": float(f.norm(dim=-1).mean()), "mean_norm": float(mean.norm()), "std_mean": float(std.mean())}


class AttentionGuide:
    """Stage-2 auxiliary loss that teaches a few decoder heads where the image content is.

    A from-scratch decoder reading 576 visual tokens, of which a few percent show objects or text,
    starts with uniform attention: the image signal in its attention output is diluted ~50x by the
    (textured) background, and in the v0 recipe the decoder never found the image within its step
    budget (it answered at chance even on one-object scenes). This loss makes the first
    ``heads`` heads of the chosen ``layers`` put their attention, from each row that predicts an
    answer's first token, on patches showing an object or text:
    ``max(0, log(target) - log(sum of attention on those patches))`` -- it stops pulling once that
    share reaches ``target`` (pulling to 1 saturated the heads within 15 steps and slowed the
    language loss in a probe). The attention is recomputed for those heads only,
    from the layer's own q/k projections and rotary embeddings captured by a forward hook (sdpa
    stays on); the other heads are unconstrained, and the trained model is a stock LLaVA.
    """

    def __init__(self, model, layers: tuple[int, ...], heads: int, target: float = 1.0):
        from ..integrations.compat import apply_rotary

        self._rotary = apply_rotary
        self.heads = heads
        self.floor = math.log(target)
        self.captured: list[tuple] = []
        decoder = model.model.language_model.layers
        bad = [i for i in layers if not -len(decoder) <= i < len(decoder)]
        if bad:
            raise ValueError(f"guide_layers {bad} out of range for a {len(decoder)}-layer decoder")
        self.num_layers = len(decoder)
        layers = dict.fromkeys(i % self.num_layers for i in layers)  # -1 and 5 are one layer: hooked once
        self.handles = [decoder[i].self_attn.register_forward_hook(self._hook, with_kwargs=True) for i in layers]

    def _hook(self, module, args, kwargs, output):
        from ..integrations.compat import K

        h = kwargs[K.HIDDEN_STATES] if K.HIDDEN_STATES in kwargs else args[0]
        self.captured.append((module, h, kwargs[K.POSITION_EMBEDDINGS]))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def probabilities(self, allowed: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities [B, heads, L, L] of the guided heads, per hooked layer (consumes the capture).

        ``allowed`` [B, L, L] bool is the attention mask the forward pass used. The decoder layer
        index of each entry is left in ``self.layers_seen``.
        """
        captured, self.captured = self.captured, []
        self.layers_seen = [module.layer_idx for module, _, _ in captured]
        out = []
        for module, h, (cos, sin) in captured:
            B, L, _ = h.shape
            d = module.head_dim
            q = module.q_proj(h).view(B, L, -1, d)[:, :, : self.heads].transpose(1, 2)
            kv_heads = [i // module.num_key_value_groups for i in range(self.heads)]
            k = module.k_proj(h).view(B, L, -1, d)[:, :, kv_heads].transpose(1, 2)
            q, k = self._rotary(q, k, cos, sin)
            scores = (q @ k.transpose(-1, -2)) * module.scaling
            out.append(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
        return out

    def _share_loss(self, p: torch.Tensor, t: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Hinge ``max(0, log target - log mass)`` over the ``share`` rows [B, L]; ``t`` broadcasts to ``p``."""
        mass = (p * t).sum(-1)  # [B, heads, L]
        log_mass = (mass[share[:, None, :].expand_as(mass)] + 1e-6).log()
        return (self.floor - log_mass).clamp_min(0).mean()

    def loss(self, rows: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor,
             layer_rows: dict[int, torch.Tensor] | None = None, uniform: torch.Tensor | None = None,
             extra: list[dict] | None = None) -> torch.Tensor:
        """rows: [B, L] bool query rows; targets: [B, L] bool target keys (the same for every row) or
        [B, L, L] (row-specific keys); allowed: [B, L, L] bool attention mask; ``layer_rows``:
        decoder layer index -> the rows guided on that layer (default: ``rows`` on every layer);
        ``uniform`` [B, L]: rows trained towards the uniform distribution over their targets instead
        (``KL(uniform || attention)``, see ``count_guide_targets``), not just a share on them;
        ``extra``: further groups ``{"rows": [B, L], "targets": [B, heads, L, L] (one target per guided
        head), "layer": int}``, each guided on its one layer (see ``position_guide_targets``)."""
        t = (targets[:, None, None, :] if targets.dim() == 2 else targets[:, None]).float()
        probs = self.probabilities(allowed)
        if layer_rows is not None:  # config layers may be negative (-1 = last)
            layer_rows = {k % self.num_layers: v for k, v in layer_rows.items()}
        total = []
        for group in extra or ():
            if group["rows"].any() and group["layer"] % self.num_layers in self.layers_seen:
                p = probs[self.layers_seen.index(group["layer"] % self.num_layers)]
                total.append(self._share_loss(p, group["targets"].float(), group["rows"]))
        for layer, p in zip(self.layers_seen, probs):
            r = rows if layer_rows is None else layer_rows.get(layer)
            if r is None or not r.any():
                continue
            share = r if uniform is None else r & ~uniform
            if share.any():
                total.append(self._share_loss(p, t, share))
            if uniform is not None and (r & uniform).any():
                n = t.sum(-1).clamp_min(1)  # [B, 1, L] keys per row
                kl = -(t * (p + 1e-6).log()).sum(-1) / n - n.log()  # KL(u || p)
                total.append(kl[(r & uniform)[:, None, :].expand_as(kl)].mean())
        if not total:  # no guided row in this batch
            return allowed.new_zeros((), dtype=torch.float32)
        return torch.stack(total).mean()


# Fields a resumed run may change: bookkeeping (always) and stage-3 settings (until stage 3 has
# taken a step) -- none of them touches the stages already run, so the result equals a straight
# run with the new values (tested).
_ANYTIME_FIELDS = ("threads", "checkpoint_every")
_STAGE3_FIELDS = ("cls_steps", "cls_batch", "cls_lr", "cls_attention_weight")


def _resume_config(saved: TrainConfig, asked: TrainConfig, state: dict, log) -> TrainConfig:
    """The config a resumed run continues with: the saved one, plus the changes that are safe."""
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


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


class _Interrupted(Exception):
    pass


def train(cfg: TrainConfig, *, progress: bool = True, log=print, stop_after: int | None = None):
    """Run (or resume) the three stages; returns the output directory holding the final model.

    ``stop_after`` ends the call after that many optimiser steps, as an interruption would (the
    state of the last checkpoint is what a resume continues from); it then returns None.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .model import build_model, build_processor, build_tokenizer

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "train_state.pt"
    if (out / "tokenizer").exists():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    else:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(out / "tokenizer")
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed, vision=cfg.vision_overrides, text=cfg.text_overrides)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    vision = model.model.vision_tower
    if cfg.vision_pos_init == "sincos":
        sincos_positions(vision)
    if cfg.vision_attn_init == "mimetic":
        mimetic_attention(vision, seed=cfg.seed)
    state = {"stage": 1, "step": 0}
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=cfg.vision_lr, weight_decay=0.01)
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        cfg = _resume_config(TrainConfig(**saved["config"]), cfg, saved["state"], log)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        state = saved["state"]
        if state["stage"] == 2:
            opt = _stage2_optimizer(model, cfg)
        elif state["stage"] == 3:
            opt = _stage3_optimizer(model, heads, cfg)
        opt.load_state_dict(saved["opt"])
        log(f"resumed from {ckpt_path} at stage {state['stage']} step {state['step']}")
    elif cfg.vision_from:
        load_vision(model, heads, cfg.vision_from)
        state = {"stage": 1, "step": cfg.vision_steps}  # stage 1 counts as done
        log(f"vision tower taken from {cfg.vision_from}; stage 1 skipped")

    def save():
        with open(out / "history.jsonl", "a") as f:  # losses since the previous save
            for h in history:
                f.write(json.dumps(h) + "\n")
        if history:
            recent = history[-20:]
            log(f"stage {state['stage']} step {state['step']}: loss {sum(h['loss'] for h in recent) / len(recent):.4f}")
        history.clear()
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "heads": heads.state_dict(),
                    "opt": opt.state_dict(), "state": state}, str(ckpt_path) + ".tmp")
        Path(str(ckpt_path) + ".tmp").replace(ckpt_path)

    history = []
    done = [0]

    def tick():
        done[0] += 1
        if stop_after is not None and done[0] >= stop_after:
            raise _Interrupted

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn()]
    try:
        with Progress(*cols, disable=not progress) as bar:

            def run_steps(stage: int, name: str, total: int, base_lr: float, seed_offset: int, step_loss,
                          clip: list | None = None) -> None:
                """The optimiser loop all stages share; ``step_loss(step)`` -> (loss, logged parts)."""
                task = bar.add_task(name, total=total, completed=state["step"], info="")
                while state["step"] < total:
                    step = state["step"]
                    for g in opt.param_groups:
                        g["lr"] = _lr(step, total, base_lr, cfg.warmup)
                    torch.manual_seed(cfg.seed * 100003 + seed_offset + step)
                    loss, parts = step_loss(step)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(clip, 1.0)
                    opt.step()
                    state["step"] += 1
                    history.append({"stage": stage, "step": step, "loss": float(loss.detach()), **parts})
                    info = parts or {"loss": float(loss.detach())}
                    bar.update(task, advance=1, info=" ".join(f"{k}={v:.3f}" for k, v in info.items()))
                    if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total:
                        save()
                    tick()

            def vision_step(step):
                return vision_loss(vision, heads, *_vision_batch(cfg, step, processor), object_loss=cfg.vision_object_loss)

            def llm_step(step):
                batch = _llm_batch(cfg, step, processor)
                guide_in = batch.pop("guide", None)
                words = batch.pop("patch_words", None)
                ground = batch.pop("ground_words", None)
                keep = batch.pop("keep_image", None)
                if keep is not None:
                    batch, words, guide_in = sparse_image_batch(model, batch, keep, words, guide_in)
                captured = []
                hook = (model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.append(o))
                        if ground is not None else None)
                try:
                    out = model(**batch)
                finally:
                    if hook is not None:
                        hook.remove()
                loss, parts = out.loss, {}
                if ground is not None:
                    gl = grounding_loss(captured[0].reshape(*ground.shape[:2], -1), ground,
                                        model.get_input_embeddings().weight)
                    loss = loss + cfg.ground_words * gl
                    parts["ground"] = float(gl.detach())
                if words is not None:
                    pw = F.cross_entropy(out.logits.flatten(0, 1).float(), words.flatten(), ignore_index=-100)
                    loss = loss + cfg.patch_words * pw
                    parts["patch_words"] = float(pw.detach())
                if guide_in is not None:
                    g = guide.loss(**guide_in)
                    loss = loss + cfg.guide_weight * g
                    parts["guide"] = float(g.detach())
                if keep is not None:
                    parts["seq"] = float(batch["attention_mask"].shape[1])
                if parts:
                    parts = {"lm": float(out.loss.detach()), **parts}
                return loss, parts

            def cls_step(step):
                pv, targets = _vision_batch(cfg, 1_000_000 + step, processor, batch=cfg.cls_batch)
                return cls_loss(vision, heads, pv, targets, cfg.cls_attention_weight), {}

            if state["stage"] == 1:
                model.train()
                run_steps(1, "stage 1 vision", cfg.vision_steps, cfg.vision_lr, 0, vision_step,
                          clip=list(vision.parameters()))
                state = {"stage": 2, "step": 0}
                if cfg.projector_init == "standardize":
                    vision.eval()
                    log(f"projector init: {standardize_projector(model, processor, cfg)}")
                opt = _stage2_optimizer(model, cfg)
                save()
            if state["stage"] == 2:
                guide_layers = (tuple(cfg.guide_layers) + tuple(cfg.guide_read_layers or ())
                                + (tuple(cfg.guide_position_layers) if cfg.guide_position else ()))
                guide = AttentionGuide(model, guide_layers, cfg.guide_heads, cfg.guide_target) if cfg.guide_weight else None
                for p in vision.parameters():
                    p.requires_grad_(False)
                model.train()
                vision.eval()
                run_steps(2, "stage 2 llm", cfg.llm_steps, cfg.llm_lr, 50_000, llm_step,
                          clip=[p for p in model.parameters() if p.requires_grad])
                if guide is not None:
                    guide.remove()
                state = {"stage": 3, "step": 0}
                opt = _stage3_optimizer(model, heads, cfg)
                save()
            run_steps(3, "stage 3 [CLS]", cfg.cls_steps, cfg.cls_lr, 90_000, cls_step)
    except _Interrupted:
        return None
    model.eval()
    final = out / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    for folder in (out, final):  # the model folder carries its recipe (installed with it)
        (folder / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return final


def load_vision(model, heads: VisionHeads, source: str | Path) -> None:
    """Copy a trained vision tower (and the stage-1 heads, if ``source`` is a train_state.pt) into ``model``."""
    source = Path(source)
    if source.is_dir():
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"vision_from={source}: no saved model there (config.json missing)")
        from transformers import AutoModelForImageTextToText

        weights, head_weights = AutoModelForImageTextToText.from_pretrained(source).state_dict(), None
    elif source.is_file():
        saved = torch.load(source, weights_only=False)
        if not isinstance(saved, dict) or "model" not in saved:
            raise ValueError(f"vision_from={source}: not a testbed train_state.pt")
        weights, head_weights = saved["model"], saved.get("heads")
    else:
        raise FileNotFoundError(f"vision_from={source}: no such file or folder")
    vision = {k: v for k, v in weights.items() if k.startswith("model.vision_tower.")}
    if not vision:
        raise ValueError(f"vision_from={source}: holds no vision tower weights")
    try:
        model.load_state_dict(vision, strict=False)
        if head_weights is not None:
            heads.load_state_dict(head_weights)
    except RuntimeError as e:
        raise ValueError(f"vision_from={source}: its vision tower does not match this architecture ({e})") from e


def _stage3_optimizer(model, heads: VisionHeads, cfg: TrainConfig):
    """Only the last vision layer, the post-layernorm and the [CLS] head train in stage 3."""
    vision = model.model.vision_tower
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(vision.encoder.layers[-1].parameters()) + list(vision.post_layernorm.parameters()) + \
        list(heads.cls.parameters())
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=cfg.cls_lr, weight_decay=0.01)


def _stage2_optimizer(model, cfg: TrainConfig):
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    return torch.optim.AdamW(params, lr=cfg.llm_lr, weight_decay=0.01)


if __name__ == "__main__":  # pragma: no cover
    t = time.time()
    train(TrainConfig())
    print(f"done in {time.time() - t:.0f}s")
