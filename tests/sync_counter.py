"""Counting host synchronisations on the CPU.

On a GPU, a host synchronisation happens wherever the host needs a value the device computed:
``.item()`` / ``int(t)`` / ``bool(t)`` (aten ``_local_scalar_dense``), ``.tolist()``, ``.cpu()``, and
the ops whose output size depends on data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``). On the CPU none of these waits, but the
same calls happen, so counting them here bounds the synchronisations the same code makes on a GPU.

``SyncCounter`` counts them with a ``TorchDispatchMode`` (the aten ops) and patched ``Tensor.tolist``
/ ``Tensor.cpu`` / ``Tensor.numpy`` (which do not dispatch as ops).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::nonzero_static",
}


def _is_sync(func, args, kwargs) -> bool:
    name = func._schema.name
    if name in _SYNC_OPS:
        return name != "aten::nonzero_static"
    if name == "aten::repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
        return kwargs.get("output_size") is None and (len(args) < 3 or args[2] is None)
    if name == "aten::index" and len(args) > 1:  # x[bool_mask]: the result size is data-dependent
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class SyncCounter(TorchDispatchMode):
    """Context manager; ``count`` is the number of synchronising calls, ``where`` their call sites
    (``file:line`` of the innermost frame under ``src/vlmprune``, else of the caller)."""

    def __init__(self):
        super().__init__()
        self.where: collections.Counter = collections.Counter()
        self._patched = {}

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _record(self, what: str):
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if "vlmprune" in f.filename and "sync_counter" not in f.filename]
        site = (ours or [f for f in frames if "torch" not in f.filename] or frames)[-1]
        self.where[f"{site.filename.rsplit('/', 1)[-1]}:{site.lineno} {what}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._record(func._schema.name.split("::")[-1])
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "cpu", "numpy"):
            orig = getattr(torch.Tensor, name)
            self._patched[name] = orig

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                self._record(_name)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._patched.items():
            setattr(torch.Tensor, name, orig)
        self._patched.clear()
        return super().__exit__(*exc)
