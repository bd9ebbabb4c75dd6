"""Crafted hostile checkpoint files against keras-ckpt's reading API, with peak memory.

Usage (from the repository root):
    .venv/bin/python benchmarks/adversarial/hostile.py --out DIR [--only NAME,...]
        [--timeout 60] [--mem-cap-gb 6] [--sources DIR] [--cli subprocess|fork]

Each recipe of `crafts.py` becomes `DIR/hostile/NAME/list/ck-02<ext>` beside
a valid `ck-01<ext>`; then read_meta, read, list, inspect, inspect --json,
resume and restore (`ops.py`) run on it, each in its own forked worker whose
address space is capped at its size at start plus `--mem-cap-gb` (a memory
blow-up shows as a MemoryError and a peak RSS near the cap rather than
swapping the machine). Peak RSS is the worker's VmHWM (it starts with the
parent's pages, `start_rss_mb`); for the CLI, the child interpreter's.

Prints one table row per file and writes `DIR/hostile.json` with every outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import crafts
import harness
import ops
import sources

ABBREV = {"CorruptCheckpointError": "Corrupt", "ForeignFileError": "Foreign",
          "StateMismatchError": "Mismatch"}


def _cell(op: str, o: dict) -> str:
    """A short verdict: `ok=expected`, `Corrupt`, `KeyError!`, `HANG`, `ck-01(fallback)`..."""
    status = o["status"]
    if status == "hang":
        return "HANG"
    if status == "crash":
        return f"CRASH:{o.get('signal', o.get('exit_code'))}"
    if op in ("inspect", "inspect_json"):
        verdict = {True: "valid", False: "invalid", None: "?"}[o.get("target_valid")]
        extra = " tb!" if o.get("traceback") else ""
        return f"{verdict} rc{o.get('rc')}{extra}" if "rc" in o else o.get("type", status)
    if status == "error":
        name = o["type"]
        changed = "+changed!" if o.get("changed_then_raised") else ""
        return ABBREV.get(name, name + "!") + changed
    if op == "resume":
        where = (o.get("resumed_from") or "fresh").split(".")[0]
        return f"{where}=" + "|".join(o.get("equals") or ["?"])
    if op in ("read", "restore"):
        return "ok=" + "|".join(o.get("equals") or ["none!"])
    if op == "read_meta":
        return "ok"
    return "ok " + ",".join(str(x[0]).split(".")[0] for x in o.get("listed", []))


def _peak(outcomes: dict) -> tuple[float, str]:
    """The highest peak RSS of any operation (worker or CLI child), in MiB, and the op."""
    best = (0.0, "")
    for op, o in outcomes.items():
        peak = max(o.get("peak_rss_mb", 0.0), o.get("children_peak_rss_mb", 0.0))
        best = max(best, (peak, op))
    return best


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)


def _context(manifest: dict, root: str) -> dict:
    """Victim and twin files outside every checkpoint directory (links point at them)."""
    place = os.path.join(root, "_elsewhere")
    os.makedirs(place, exist_ok=True)
    ctx = {}
    for key, (name, which, ext) in {"victim": ("weights_async", "new", ".weights.h5"),
                                    "victim_keras": ("keras_async", "new", ".keras"),
                                    "twin": ("weights_default", "new", ".weights.h5")}.items():
        ctx[key] = os.path.join(place, key + ext)
        shutil.copyfile(manifest[name][which], ctx[key])
    return ctx


def run_one(name: str, manifest: dict, refs: dict, ctx: dict, root: str,
            args: argparse.Namespace) -> dict:
    """Crafts file `name` and runs every operation on it in capped, separate workers."""
    ext, recipe = crafts.RECIPES[name]
    source = "weights_default" if ext == ".weights.h5" else "keras_default"
    victim = "weights_async" if ext == ".weights.h5" else "keras_async"
    work = os.path.join(root, name)
    shutil.rmtree(work, ignore_errors=True)
    list_dir, resume_dir = os.path.join(work, "list"), os.path.join(work, "resume")
    os.makedirs(list_dir)
    shutil.copyfile(manifest[source]["old"], os.path.join(list_dir, sources.OLD + ext))
    path = os.path.join(list_dir, sources.NEW + ext)
    recipe(manifest[source]["new"], path, ctx)
    shutil.copytree(list_dir, resume_dir)
    cap = int(args.mem_cap_gb * (1 << 30))
    target = ops.Target(list_dir=list_dir, resume_dir=resume_dir, ext=ext,
                        kwargs=sources.checkpoint_kwargs(source),
                        refs={"expected": refs[source]["new"], "older": refs[source]["old"],
                              "victim": refs[victim]["new"]},
                        cli_mode=args.cli, timeout=args.timeout, mem_bytes=cap + (1 << 30))
    with open(os.path.join(root, "worker.log"), "ab") as log:
        outcomes = harness.run_ops(list(ops.OPS), lambda op: ops.run_op(target, op),
                                   args.timeout, one_per_child=True, log_fd=log.fileno(),
                                   mem_extra=cap)
    size = os.path.getsize(path)
    if size > (64 << 20):
        os.remove(path)  # the zip bomb is re-made from its recipe; keep DIR small
        shutil.rmtree(resume_dir, ignore_errors=True)
    return {"name": name, "recipe": crafts.describe(name), "ext": ext, "source": source,
            "size": size, "outcomes": outcomes}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated recipe names")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds each operation may take before it counts as a hang")
    parser.add_argument("--mem-cap-gb", type=float, default=6.0,
                        help="address space each worker may add (GiB)")
    parser.add_argument("--cli", choices=("fork", "subprocess"), default="subprocess")
    parser.add_argument("--sources", help="reuse the source checkpoints in this directory")
    return parser.parse_args()


def main() -> int:
    """Crafts every hostile file, runs the operations, prints the table."""
    args = _parse()
    out = os.path.abspath(args.out)
    root = os.path.join(out, "hostile")
    os.makedirs(root, exist_ok=True)
    manifest = sources.make_sources(args.sources or os.path.join(out, "sources"))
    refs = {n: {w: sources.reference(e[w]) for w in ("old", "new")} for n, e in manifest.items()}
    ctx = _context(manifest, root)
    names = args.only.split(",") if args.only else list(crafts.RECIPES)
    library = harness.library_fingerprint()
    results = []
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(run_one(name, manifest, refs, ctx, root, args))
    with open(os.path.join(out, "hostile.json"), "w") as f:
        json.dump({"library": library, "command": " ".join(sys.argv), "results": results},
                  f, indent=1)
    header = ["file", *ops.OPS, "peak RSS MiB (op)"]
    rows = [header]
    for r in results:
        peak, op = _peak(r["outcomes"])
        rows.append([r["name"], *(_cell(o, r["outcomes"][o]) for o in ops.OPS),
                     f"{peak:.0f} ({op})"])
    print(_table(rows))
    base = min(o.get("start_rss_mb", 0) for r in results for o in r["outcomes"].values()
               if "start_rss_mb" in o)
    print(f"\nworkers start at ~{base:.0f} MiB RSS (the parent's pages); cap: +"
          f"{args.mem_cap_gb} GiB of address space per worker")
    for r in results:
        print(f"\n{r['name']}: {r['recipe']}")
        for op, o in r["outcomes"].items():
            if o["status"] != "ok" and o.get("kind") != "ckpt":
                print(f"  {op}: {o['status']} {o.get('type', '')}: {o.get('message', '')[:200]}")
                for line in o.get("tb", [])[-3:]:
                    print(f"      {line.strip()[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
