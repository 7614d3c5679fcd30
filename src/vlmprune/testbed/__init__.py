"""The testbed: ShapesVQA scenes and questions, their prompt, and the small trained LLaVA shipped with vlmprune.

``vlmprune.testbed.load()`` returns ``(model, processor)`` for the committed checkpoint (or a
path); it is imported lazily so that the scene generator does not pull in transformers.
"""


def __getattr__(name: str):
    if name == "load":
        from .model import load

        return load
    raise AttributeError(f"module 'vlmprune.testbed' has no attribute {name!r}")
