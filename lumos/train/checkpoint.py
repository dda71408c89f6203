"""Checkpoint files of :func:`lumos.fit`: written atomically, read back with clear errors.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, numbers, strings,
lists, dicts), so that it loads with ``torch.load(weights_only=True)``::

    {"format": FORMAT, "version": VERSION,
     "model": model_fingerprint(model), "settings": {...},   # what must match to resume
     "state": FitLoop.state_dict()}                          # what a resumed run continues from

:func:`save_atomic` writes a temporary file beside the target, flushes and fsyncs it, renames
it over the target and fsyncs the folder: a reader (or a run killed at any instant) sees the
old file or the new one, never a mix. :func:`read_checkpoint` refuses a truncated or foreign
file, and :func:`check_fingerprint` one written for another model or with other settings; in
both cases the file is left as it is.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
from torch import nn

FORMAT = "lumos.fit checkpoint"
VERSION = 1


def temp_path(path: Path) -> Path:
    """Where :func:`save_atomic` writes before renaming: a hidden file in the same folder (a
    rename is atomic only within one file system)."""
    return path.with_name(f".{path.name}.tmp")


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temp file, flush + fsync, rename, fsync the folder."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp(path: Path) -> None:
    """Delete the temp file a run killed while writing ``path`` left behind."""
    temp_path(path).unlink(missing_ok=True)


def read_checkpoint(path: Path, who: str, map_location=None) -> dict:
    """The checkpoint at ``path``, or a clear error if it is truncated, unreadable or not a
    checkpoint of :func:`lumos.fit` (the file is never modified)."""
    keep = "the file is left as it is: move or delete it to start a new run, or pass another `checkpoint` path"
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, a pickle of foreign objects, a text file...
        size = path.stat().st_size if path.exists() else 0
        reason = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"{who}: cannot read checkpoint `{path}` ({size:,} bytes): it is truncated, corrupt or not "
                         f"a torch file ({type(err).__name__}: {reason}). lumos writes "
                         f"checkpoints atomically, so this file was not completely written by lumos.fit; "
                         f"{keep}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{who}: `{path}` is a torch file but not a lumos.fit checkpoint; {keep}")
    if data.get("version") != VERSION:
        raise ValueError(f"{who}: checkpoint `{path}` has format version {data.get('version')!r}; this lumos "
                         f"reads version {VERSION}; {keep}")
    return data


# -- what must match to resume -------------------------------------------------------------------

def model_fingerprint(model: nn.Module) -> dict:
    """The model's class and every state_dict entry's shape and dtype, and the gates' settings."""
    from ..gates import gates_of

    inner = getattr(model, "model", model)
    entries = {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in model.state_dict().items()
               if isinstance(t, torch.Tensor)}
    gates = {name: [g.n, g.t_l, g.t_u, g.beta, g.gamma, g.zeta] for name, g in gates_of(model)}
    return {"class": f"{type(model).__name__}({type(inner).__name__})", "entries": entries, "gates": gates}


def _model_differences(saved: dict, now: dict) -> list[str]:
    notes = []
    if saved["class"] != now["class"]:
        notes.append(f"the model is a {saved['class']} there and a {now['class']} here")
    missing = [k for k in saved["entries"] if k not in now["entries"]]
    extra = [k for k in now["entries"] if k not in saved["entries"]]
    if missing:
        notes.append(f"entries only in the checkpoint: {', '.join(f'`{k}`' for k in missing[:5])}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        notes.append(f"entries only in this model: {', '.join(f'`{k}`' for k in extra[:5])}"
                     + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    for key, (shape, dtype) in saved["entries"].items():
        if key in now["entries"] and now["entries"][key] != [shape, dtype]:
            here = now["entries"][key]
            notes.append(f"`{key}` is {tuple(shape)} {dtype} there and {tuple(here[0])} {here[1]} here")
            if len(notes) >= 6:
                break
    for name, hyper in saved["gates"].items():
        if name in now["gates"] and now["gates"][name] != hyper:
            notes.append(f"gate `{name}` has (n, t_l, t_u, beta, gamma, zeta) = {tuple(hyper)} there and "
                         f"{tuple(now['gates'][name])} here")
            break
    return notes


def check_fingerprint(data: dict, model: nn.Module, settings: dict, path: Path, who: str) -> dict:
    """Refuse a checkpoint written for another model or with other settings that matter;
    return the settings that changed but may (``lr``, ``precision``...: see ``fit``)."""
    keep = ("The file is left as it is: resume with the same model and settings, or pass another "
            "`checkpoint` path (or delete the file) to start a new run")
    notes = _model_differences(data["model"], model_fingerprint(model))
    if notes:
        raise ValueError(f"{who}: checkpoint `{path}` was written for a different model: "
                         + "; ".join(notes) + f". {keep}")
    saved = data["settings"]
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    refused = {k: pair for k, pair in changed.items() if k not in RESUMABLE_CHANGES}
    if refused:
        listed = "; ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in refused.items())
        raise ValueError(f"{who}: checkpoint `{path}` was written by a run with other settings that matter: "
                         f"{listed}. {keep}")
    return {k: pair for k, pair in changed.items() if k in RESUMABLE_CHANGES}


# A resumed run may change these: the rest would change what the saved state means.
RESUMABLE_CHANGES = ("lr", "precision", "epochs")


# -- random number generators --------------------------------------------------------------------

def rng_states(device: torch.device) -> dict:
    """torch's CPU (and ``device``'s CUDA) RNG, Python's ``random`` and, if imported, NumPy's."""
    states = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(_tuples(states["python"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
    if "numpy" in states:
        import numpy

        kind, keys, pos, has_gauss, gauss = states["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), pos, has_gauss, gauss))


def _plain(value):
    """Python's RNG state (nested tuples of ints) as lists, which ``weights_only`` loading takes."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
