"""vlmprune: adaptive visual-token pruning and merging for vision-language models.

    import vlmprune
    handle = vlmprune.apply(model, "prumerge+")   # model: a transformers LLaVA
    model.generate(**inputs)                        # faster, same API
    handle.stats; handle.remove()
"""

from .api import apply, list_methods, pruned, remove
from .registry import register_method

__all__ = ["apply", "pruned", "remove", "list_methods", "register_method"]
__version__ = "0.1.0"
