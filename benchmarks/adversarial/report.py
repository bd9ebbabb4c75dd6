"""Findings of one case, and the summary tables of a campaign.

A finding is a short key:
- `hang:OP`, `crash:OP`: the operation timed out / its worker died;
- `foreign:OP:TYPE`: it raised something other than keras-ckpt's
  `CorruptCheckpointError`/`ForeignFileError` (or `StateMismatchError`,
  counted apart as `mismatch`); for the CLI, a traceback's exception or a
  non-zero exit;
- `cli_traceback:OP`: a Python traceback on the CLI's stderr;
- `silent_wrong:read|restore|resume`: it succeeded with arrays that differ
  from the source checkpoint's (for `resume`: from the one it says it
  resumed from);
- `failed_fallback`: `storage.read` rejects the damaged file, and the resume
  did not continue from the valid older checkpoint;
- `changed_then_raised`: `restore` raised after changing model variables;
- `inspect_valid_read_rejects:OP`: the CLI calls the file valid, `read`
  rejects it (the CLI reads metadata only, by design: reported, not notable);
- `resume_refused_readable:TYPE`: `read` accepts the file, resume raised.
"""

from __future__ import annotations

import collections

COLUMNS = ("ok", "ckpt", "mismatch", "foreign", "hang", "crash")
_EXPECTED = ("inspect_valid_read_rejects",)


def findings(record: dict) -> list[str]:
    """The finding keys of one case record (see the module docstring)."""
    out = record["outcomes"]
    found = []
    for op, o in out.items():
        if o["status"] in ("hang", "crash"):
            found.append(f"{o['status']}:{op}")
        elif o["status"] == "error" and o.get("kind") == "foreign":
            found.append(f"foreign:{op}:{o['type']}")
        if o.get("traceback"):
            found.append(f"cli_traceback:{op}")
    for op in ("read", "restore"):
        o = out.get(op, {})
        if o.get("status") == "ok" and o.get("n_differs"):
            found.append(f"silent_wrong:{op}")
    read, resume, restore = out.get("read", {}), out.get("resume", {}), out.get("restore", {})
    if resume.get("status") == "ok" and resume.get("differs"):
        found.append("silent_wrong:resume")
    rejected = read.get("status") not in (None, "ok")
    if rejected and "resume" in out and not (
            resume.get("status") == "ok" and resume.get("fell_back")):
        found.append("failed_fallback")
    if restore.get("status") == "error" and restore.get("changed_then_raised"):
        found.append("changed_then_raised")
    for op in ("inspect", "inspect_json"):
        if rejected and out.get(op, {}).get("target_valid"):
            found.append(f"inspect_valid_read_rejects:{op}")
    if read.get("status") == "ok" and resume.get("status") == "error":
        found.append(f"resume_refused_readable:{resume.get('type')}")
    return found


def notable(found: list[str]) -> bool:
    """Whether a case is worth keeping: a finding beyond the by-design ones."""
    return any(not f.startswith(_EXPECTED) for f in found)


def _column(outcome: dict) -> str:
    status = outcome["status"]
    return outcome.get("kind", "foreign") if status == "error" else status


def summarize(records: list[dict], elapsed: float) -> dict:
    """Counts per operation, per finding and per mutation class, and example case ids."""
    per_op: dict = collections.defaultdict(collections.Counter)
    foreign: dict = collections.defaultdict(collections.Counter)
    found_counts: collections.Counter = collections.Counter()
    per_class: dict = collections.defaultdict(collections.Counter)
    examples: dict = collections.defaultdict(list)
    for r in records:
        for op, o in r["outcomes"].items():
            per_op[op][_column(o)] += 1
            if o["status"] == "error" and o.get("kind") == "foreign":
                foreign[op][o["type"]] += 1
        klass = per_class[r["class"]]
        klass["cases"] += 1
        klass["read rejects"] += r["outcomes"].get("read", {}).get("status") != "ok"
        for prefix in {f.split(":")[0] for f in r["findings"]}:
            klass[prefix] += 1
        for f in set(r["findings"]):
            found_counts[f] += 1
            if len(examples[f]) < 3:
                examples[f].append(r["id"])
    return {"cases": len(records), "seconds": round(elapsed, 1),
            "per_op": {op: dict(c) for op, c in per_op.items()},
            "foreign_types": {op: dict(c) for op, c in foreign.items()},
            "findings": dict(sorted(found_counts.items())),
            "per_class": {k: dict(v) for k, v in sorted(per_class.items())},
            "examples": dict(sorted(examples.items()))}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                               in enumerate(zip(r, widths, strict=True))) for r in rows)


def format_summary(s: dict) -> str:
    """The summary as text tables."""
    lines = [f"{s['cases']} cases in {s['seconds']} s "
             f"({s['seconds'] / max(1, s['cases']):.2f} s/case)", ""]
    rows = [["operation", *COLUMNS]]
    for op, counts in s["per_op"].items():
        rows.append([op, *(str(counts.get(c, 0)) for c in COLUMNS)])
    lines += [_table(rows), ""]
    if s["foreign_types"]:
        lines.append("foreign error types:")
        for op, types in s["foreign_types"].items():
            lines.append(f"  {op}: " + ", ".join(f"{t} x{n}" for t, n in
                                                 sorted(types.items(), key=lambda kv: -kv[1])))
        lines.append("")
    keys = ("silent_wrong", "failed_fallback", "changed_then_raised", "inspect_valid",
            "cli_traceback", "hang", "crash", "foreign", "resume_refused")
    rows = [["class", "cases", "read rejects", *keys]]
    for klass, c in s["per_class"].items():
        rows.append([klass, str(c.get("cases", 0)), str(c.get("read rejects", 0)),
                     *(str(sum(v for k, v in c.items() if k.startswith(key))) for key in keys)])
    lines += [_table(rows), "", "findings (count, first case ids):"]
    for key, count in s["findings"].items():
        lines.append(f"  {key}: {count}  e.g. {s['examples'][key]}")
    return "\n".join(lines)
