"""The testbed LLaVA's training recipe, one file per job.

``config`` (settings, resume), ``vision`` (stages 1 and 3), ``projector`` (stage 2's projector
init), ``batch`` (stage 2's batches), ``words`` / ``auxiliary`` (patch naming, grounding),
``guide`` / ``guide_targets`` (attention guidance), ``dropout`` (background dropout) and ``loop``
(the three stages). ``train(TrainConfig(...))`` runs it; docs/testbed.md describes the recipe.
"""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
