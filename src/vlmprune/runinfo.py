"""What produced a results file: the ``run`` block shared by ``eval``, ``tables``, ``demo`` and ``bench``.

``results.json`` (and ``WHICH.json`` of ``tables``, ``demo.json``) is
``{"schema": RESULTS_SCHEMA, "run": {...}, "results": [...]}``; ``bench``'s ``card.json`` carries
the same ``run`` block beside its own fields. ``RUN_FIELDS`` lists every key of ``run``:

* ``kind`` -- the command (``eval``, ``tables vision``, ``demo``, ``bench``);
* ``command`` / ``argv`` -- the command line as typed (shell-quoted) and as a list;
* ``status`` -- ``running`` (written after each finished method), ``complete``, ``interrupted``
  (Ctrl-C: the finished methods are kept) or ``failed``;
* ``started`` / ``finished`` -- UTC ISO-8601 times (``finished`` is null until the run ends);
* ``model`` -- ``path`` and ``weights_sha256`` (sha256 over the weight files' sha256 in name
  order; null for a hub id not on disk), ``weights_files`` ({file name: sha256}), ``dtype``;
* ``data`` -- ``source`` ``"shapesvqa"`` with ``split``, ``families``, ``n`` (per family),
  ``blank`` and ``scene_seeds`` (how the scene seeds are derived), or ``"jsonl"`` with ``file``,
  ``sha256`` and ``records``;
* ``methods`` -- one entry per method run: ``label``, ``method`` (null = unpruned), ``stage``,
  ``options`` (as given) and ``resolved`` (every option, defaults filled in);
* ``generation`` -- ``max_new_tokens``, ``do_sample`` (false: greedy), ``batch_size``,
  ``prompt_template``;
* ``versions`` -- python, torch, transformers, vlmprune, accelerate, numba (null when absent), and
  ``cpu_kernels``: "off" when ``VLMPRUNE_CPU_KERNELS=0`` turned PruMerge's CPU kernel off, else "on"
  (it then runs wherever numba compiles it);
* ``machine`` -- ``cpu_model``, ``cores_logical``, ``platform``, ``torch_threads``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

RESULTS_SCHEMA = "vlmprune.results/1"
RUN_FIELDS = ("kind", "command", "argv", "status", "started", "finished", "model", "data", "methods", "generation",
              "versions", "machine")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_info(path: str | Path, dtype: Any = None) -> dict[str, Any]:
    """``{"path", "weights_sha256", "weights_files", "dtype"}`` of a model folder (a hub id: no hashes)."""
    p = Path(path)
    files: dict[str, str] = {}
    if p.is_dir():
        files = {f.name: sha256_file(f) for f in sorted(p.iterdir()) if f.suffix in WEIGHT_SUFFIXES and f.is_file()}
    combined = hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest() if files else None
    return {"path": str(p.resolve()) if p.exists() else str(path), "weights_sha256": combined,
            "weights_files": files, "dtype": None if dtype is None else str(dtype).replace("torch.", "")}


def shapesvqa_data(split: str, families: Sequence[str], n: int, blank: bool = False) -> dict[str, Any]:
    return {"source": "shapesvqa", "split": split, "families": list(families), "n": n, "blank": blank,
            "scene_seeds": f"vlmprune.testbed.scenes.split_seed({split!r}, i) for i = 0, 1, ... (deterministic)"}


def jsonl_data(path: str | Path, records: int) -> dict[str, Any]:
    return {"source": "jsonl", "file": str(Path(path).resolve()), "sha256": sha256_file(path), "records": records}


def method_entry(label: str, name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The ``methods`` entry of one run: the given options and all of them resolved."""
    from .registry import get_method

    if name is None:
        return {"label": label, "method": None, "stage": None, "options": {}, "resolved": {}}
    info = get_method(name)
    resolved = info.resolve(options)
    return {"label": label, "method": name, "stage": info.stage, "options": {k: resolved[k] for k in options},
            "resolved": resolved}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vlmprune", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["numba"] = version("numba")  # not imported: that alone takes ~0.3 s
    except PackageNotFoundError:
        out["numba"] = None
    from .methods.neighbours import cpu_kernels_enabled

    out["cpu_kernels"] = "on" if cpu_kernels_enabled() else "off"
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_model": cpu_model(), "cores_logical": os.cpu_count(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def command_line(argv: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """(``vlmprune ARGS`` shell-quoted, the argument list) of this process."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "vlmprune " + " ".join(shlex.quote(a) for a in args), args


def new_run(kind: str, *, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
            generation: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A ``run`` block with status ``running``; ``methods`` fills as methods finish."""
    command, args = command_line(argv)
    return {"kind": kind, "command": command, "argv": args, "status": "running", "started": now(), "finished": None,
            "model": model, "data": data, "methods": [], "generation": generation or {}, "versions": versions(),
            "machine": machine()}
