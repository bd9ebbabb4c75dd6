"""The operations run on each damaged or hostile checkpoint (inside a forked worker).

Each returns the extra fields of its outcome; `harness.guarded` turns what it
raises into an error outcome. A target is one file, `ck-02<ext>`, in a
directory beside a valid older `ck-01<ext>`; `resume` gets its own copy of
that directory (a fit writes into it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import keras
import numpy as np
from harness import TRACEBACK, classify_name, error_outcome, run_cli
from sources import NEW, OLD, TEMPLATE, build_model, data, differing

import keras_ckpt
from keras_ckpt import storage

OPS = ("read_meta", "read", "list", "inspect", "inspect_json", "resume", "restore")


@dataclasses.dataclass
class Target:
    """One file under test and the directories and references its operations need.

    Attributes:
        list_dir: holds the file (`ck-02<ext>`) and a valid older `ck-01<ext>`.
        resume_dir: a copy of `list_dir` for `resume`.
        ext: `.weights.h5` or `.keras`.
        kwargs: the ModelCheckpoint arguments the source was written with.
        refs: named reference arrays (`expected`: what the file should read as;
            `older`: the valid `ck-01`; others, e.g. a file a link points at).
        cli_mode: `fork` or `subprocess` (see `harness.run_cli`).
        timeout: seconds for each CLI run.
        mem_bytes: address-space cap of a `subprocess` CLI run (None: none).
    """

    list_dir: str
    resume_dir: str
    ext: str
    kwargs: dict
    refs: dict
    cli_mode: str = "fork"
    timeout: float = 20.0
    mem_bytes: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.list_dir, NEW + self.ext)


def _matches(t: Target, arrays: dict, keys: tuple[str, ...] = ()) -> tuple[list, list]:
    """(names of the references `arrays` equals, arrays differing from `expected`)."""
    def pick(ref: dict) -> dict:
        return {k: v for k, v in ref.items() if not keys or k.startswith(keys)}

    equals = [name for name, ref in t.refs.items()
              if ref is not None and not differing(arrays, pick(ref))]
    expected = t.refs.get("expected")
    bad = differing(arrays, pick(expected)) if expected is not None else []
    return equals, bad


def _progress(meta: dict) -> dict:
    progress = meta.get("progress")
    if not isinstance(progress, dict):
        return {"progress": repr(progress)[:60]}
    return {k: progress.get(k) for k in ("epoch", "global_step") if k in progress}


def op_read_meta(t: Target) -> dict:
    """`storage.read_meta(path)`."""
    meta = storage.read_meta(t.path)
    return {k: v if isinstance(v, (int, float, str, type(None))) else repr(v)[:60]
            for k, v in _progress(meta).items()}


def op_read(t: Target) -> dict:
    """`storage.read(path)`; which references the arrays equal, which differ from expected."""
    snapshot = storage.read(t.path)
    equals, bad = _matches(t, snapshot.arrays)
    return {"equals": equals, "differs": bad[:5], "n_differs": len(bad)}


def op_list(t: Target) -> dict:
    """`keras_ckpt.list_checkpoints(dir)`."""
    infos = keras_ckpt.list_checkpoints(t.list_dir)
    return {"listed": [[os.path.basename(c.path), c.global_step] for c in infos]}


def _cli(t: Target, as_json: bool) -> dict:
    """`python -m keras_ckpt inspect DIR [--json]`: exit code, traceback, the file's verdict."""
    args = ["inspect", t.list_dir] + (["--json"] if as_json else [])
    r = run_cli(args, t.timeout, t.cli_mode, t.mem_bytes)
    if r.get("hang"):
        return {"status": "hang", "timeout_s": t.timeout}
    if "signal" in r:
        return {"status": "crash", "signal": r["signal"], "stderr_tail": r["stderr"][-300:]}
    out = {"rc": r["rc"], "traceback": TRACEBACK in r["stderr"],
           "stderr_tail": r["stderr"].strip().splitlines()[-3:], "target_valid": None}
    name = NEW + t.ext
    if as_json and r["rc"] == 0:
        try:
            rows = json.loads(r["stdout"])
            row = next((x for x in rows if os.path.basename(x["path"]) == name), None)
            out["target_valid"] = None if row is None else bool(row["valid"])
        except (ValueError, KeyError, TypeError) as e:
            out["json_error"] = repr(e)[:120]
    elif r["rc"] == 0:
        for line in r["stdout"].splitlines():
            if line.startswith(name + " "):
                verdict = re.search(r"\b(valid|corrupt|foreign)\b", line[len(name):])
                out["target_valid"] = verdict is not None and verdict.group(1) == "valid"
    if out["traceback"]:
        last = out["stderr_tail"][-1] if out["stderr_tail"] else ""
        kind = last.split(":", 1)[0].rsplit(".", 1)[-1]
        out.update(status="error", type=kind, kind=classify_name(kind), message=last[:300])
    elif r["rc"] != 0:
        out.update(status="error", type=f"exit{r['rc']}", kind="foreign",
                   message=r["stderr"][-300:])
    return out


def op_inspect(t: Target) -> dict:
    """The CLI's table."""
    return _cli(t, as_json=False)


def op_inspect_json(t: Target) -> dict:
    """The CLI's JSON."""
    return _cli(t, as_json=True)


def _state(model: keras.Model) -> dict[str, np.ndarray]:
    arrays = {f"model/{i:05d}": np.array(v) for i, v in enumerate(model.variables)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        arrays.update({f"optimizer/{i:05d}": np.array(v)
                       for i, v in enumerate(optimizer.variables)})
    return arrays


class _Probe(keras.callbacks.Callback):
    """Records the model's and optimizer's state once every train-begin hook has run."""

    state: dict | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.state = _state(self.model)


def op_resume(t: Target) -> dict:
    """`fit` with `ModelCheckpoint(template, resume=True)`; where it resumed from and what.

    `epochs=2`, as the sources: resuming from `ck-02` has nothing left to train,
    falling back to `ck-01` trains (and saves) its second epoch again.
    """
    x, y = data()
    model = build_model("A")
    probe = _Probe()
    checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(t.resume_dir, TEMPLATE + t.ext),
                                            resume=True, **t.kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.fit(x, y, epochs=2, verbose=0, callbacks=[checkpoint, probe])
        except Exception as exc:  # noqa: BLE001 - recorded, with the warnings before it
            out = error_outcome(exc)
            out["warnings"] = [str(w.message)[:200] for w in caught][:3]
            return out
    resumed = checkpoint.resumed_from
    name = None if resumed is None else os.path.basename(resumed.path)
    out = {"resumed_from": name, "fell_back": name == OLD + t.ext,
           "warnings": [str(w.message)[:200] for w in caught
                        if "heckpoint" in str(w.message)][:3]}
    if name is not None and probe.state is not None:
        ref = t.refs.get("older" if name == OLD + t.ext else "expected")
        bad = differing(probe.state, {k: v for k, v in (ref or {}).items()
                                      if k.startswith(("model/", "optimizer/"))})
        out["differs"] = bad[:5] if ref is not None else None
        out["equals"], _ = _matches(t, probe.state, ("model/", "optimizer/"))
    return out


def op_restore(t: Target) -> dict:
    """`keras_ckpt.restore(model, path)`; whether the model changed although it raised."""
    model = build_model("A")
    before = _state(model)
    try:
        keras_ckpt.restore(model, t.path)
    except Exception as exc:  # noqa: BLE001 - recorded
        out = error_outcome(exc)
        after = _state(model)
        out["changed_then_raised"] = [k for k in before if k in after
                                      and not np.array_equal(before[k], after[k])][:5]
        return out
    equals, bad = _matches(t, _state(model), ("model/", "optimizer/"))
    return {"equals": equals, "differs": bad[:5], "n_differs": len(bad)}


FUNCS = {"read_meta": op_read_meta, "read": op_read, "list": op_list, "inspect": op_inspect,
         "inspect_json": op_inspect_json, "resume": op_resume, "restore": op_restore}


def run_op(t: Target, op: str) -> dict:
    """Runs operation `op` on `t` (in a worker)."""
    return FUNCS[op](t)
