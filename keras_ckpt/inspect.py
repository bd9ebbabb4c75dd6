"""`python -m keras_ckpt inspect DIR`: a table of the checkpoints in a directory."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any

from keras_ckpt.jsonsafe import encode_float
from keras_ckpt.manager import CheckpointInfo, list_checkpoints, read_verified_lazily
from keras_ckpt.monitor import infer_mode
from keras_ckpt.plots import draw, plot_checkpoints
from keras_ckpt.shards import ShardFiles
from keras_ckpt.storage import read_meta
from keras_ckpt.storage_format import CorruptCheckpointError

__all__ = ["run_inspect", "describe"]


def describe(directory: str, verify: bool = True) -> list[dict]:
    """One dict per file: the `CheckpointInfo` fields plus `valid`, `latest` and `best`.

    `best` marks the checkpoint the callbacks that wrote the directory hold
    best: the best epoch of the newest checkpoint's ModelCheckpoint
    (`save_best_only`) or EarlyStopping state, with its `min_delta` and
    baseline (`best_by` names it); without one, the best finite monitored
    value, where the monitor's direction can be told from its name (`*loss`:
    min; accuracy, AUC and other Keras metrics: their direction).

    Args:
        directory: the checkpoint directory.
        verify: read every checkpoint whole and check every checksum, as
            resume does, so that "valid" means what resume would accept
            (one file in memory at a time); False reads the metadata only.
    """
    infos = list_checkpoints(directory, include_invalid=True)
    if verify:
        infos = [_verified(c) for c in infos]
    valid = [c for c in infos if c.valid and c.finite]
    latest = valid[-1].path if valid else None
    objects = _newest_objects(valid)
    best, best_by = _callbacks_best(valid, objects)
    scored = [c for c in valid if c.monitor_value is not None]
    if best is None and scored:
        mode = infer_mode(scored[-1].monitor)
        if mode is not None:
            same = [c for c in scored if c.monitor == scored[-1].monitor]
            best = (min if mode == "min" else max)(same, key=lambda c: c.monitor_value).path
            best_by = f"{scored[-1].monitor} ({mode})"
    rows = []
    for c in infos:
        row = dataclasses.asdict(c)
        row["valid"] = c.valid
        row["latest"] = c.path == latest
        row["best"] = c.path == best
        row["best_by"] = best_by if c.path == best else None
        row["save_freq_auto"] = _auto_choice(objects) if c.path == latest else None
        rows.append(row)
    return rows


def _newest_objects(valid: list[CheckpointInfo]) -> dict:
    """The callbacks' states in the newest valid checkpoint ({} if none)."""
    if not valid:
        return {}
    try:
        objects = read_meta(valid[-1].path).get("objects", {})
    except CorruptCheckpointError:
        return {}
    return objects if isinstance(objects, dict) else {}


def _auto_choice(objects: dict) -> dict | None:
    """What ModelCheckpoint's `save_freq="auto"` chose, as its newest checkpoint holds it."""
    state = (objects.get("ModelCheckpoint") or {}).get("json", {}).get("save_freq_auto")
    chosen = state.get("chosen") if isinstance(state, dict) else None
    keys = ("every_steps", "save_seconds", "step_seconds", "expected_overhead", "overhead")
    if not isinstance(chosen, dict) or not all(
            isinstance(chosen.get(k), (int, float)) and not isinstance(chosen.get(k), bool)
            for k in keys):
        return None
    return {k: chosen[k] for k in keys}


def _callbacks_best(valid: list[CheckpointInfo],
                    objects: dict) -> tuple[str | None, str | None]:
    """(path, callback) of the best epoch-end checkpoint as the newest one's callbacks judge."""
    for name in ("ModelCheckpoint", "EarlyStopping"):
        state = (objects.get(name) or {}).get("json", {}).get("monitor") or {}
        epoch = state.get("best_epoch") if isinstance(state, dict) else None
        if isinstance(epoch, int):
            at = [c for c in valid if c.epoch == epoch and c.epoch_complete]
            if at:
                return at[-1].path, f"{name} ({state.get('monitor')})"
    return None, None


def _verified(info: CheckpointInfo) -> CheckpointInfo:
    if info.error is not None:
        return info
    try:
        with read_verified_lazily(info.path) as snapshot:  # every checksum; two arrays at most
            if "shards" in snapshot.meta:  # and every shard file's (split variables)
                files = ShardFiles(info.path, snapshot.meta["shards"])
                files.open(None)
                files.close()
    except CorruptCheckpointError as e:
        return dataclasses.replace(info, error=str(e))
    return info


def _json_value(value: Any) -> Any:
    """A row's value as strict JSON: non-finite floats as keras-ckpt writes them."""
    return encode_float(value) if isinstance(value, float) else value


def _fmt(c: dict) -> list[str]:
    written = (datetime.datetime.fromtimestamp(c["written_at"]).strftime("%Y-%m-%d %H:%M:%S")
               if c["written_at"] else "-")
    value = "-" if c["monitor_value"] is None else f"{c['monitor']}={c['monitor_value']:.5g}"
    status = "valid" if c["valid"] else ("foreign" if c["kind"] == "foreign" else "corrupt")
    labels = [status] + [name for name in ("latest", "best") if c[name]]
    return [os.path.basename(c["path"]), "-" if c["epoch"] is None else str(c["epoch"] + 1),
            "-" if c["step"] is None else str(c["step"]), value, f"{c['size'] / 1024:.0f} KiB",
            written, " ".join(labels)]


def run_inspect(directory: str, as_json: bool = False, verify: bool = True,
                plot: str | None = None) -> int:
    """Prints the table (or JSON); returns 1 if the directory does not exist.

    `verify`: see `describe` (the CLI's `--meta-only` turns it off). `plot`:
    also draw the rows into this PNG (`keras_ckpt.plots.plot_checkpoints`);
    returns 4 if that fails.
    """
    if os.path.isfile(directory):
        parent = os.path.dirname(os.path.abspath(directory))
        print(f"{directory} is a file; inspect lists a checkpoint directory: "
              f"python -m keras_ckpt inspect {parent}")
        return 1
    if not os.path.isdir(directory):
        print(f"No such directory: {directory}")
        return 1
    rows = describe(directory, verify=verify)
    if not rows and not as_json:
        print(f"No keras-ckpt checkpoints in {directory}.")
        return 0
    if as_json:
        # Epochs count from 1, as in the table, Keras's progress bar and `{epoch}` in names.
        numbered = [{**row, "epoch": None if row["epoch"] is None else row["epoch"] + 1}
                    for row in rows]
        print(json.dumps([{k: _json_value(v) for k, v in row.items()} for row in numbered],
                         indent=2, allow_nan=False, default=str))
        return draw(plot, True, plot_checkpoints, rows, directory)
    table = [["file", "epoch", "step", "monitored", "size", "written", "status"]]
    table += [_fmt(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    auto = next((r["save_freq_auto"] for r in rows if r["save_freq_auto"]), None)
    if auto is not None:
        print(f"save_freq='auto' (newest checkpoint): a save every {auto['every_steps']} steps; "
              f"a save blocks {auto['save_seconds']:.3g} s, a step takes "
              f"{auto['step_seconds']:.3g} s: {100 * auto['expected_overhead']:.1f}% of "
              f"training time (target {100 * auto['overhead']:.1f}%)")
    return draw(plot, False, plot_checkpoints, rows, directory)
