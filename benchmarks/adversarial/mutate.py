"""Adversarial mutation runner: damage real checkpoints thousands of ways, see what breaks.

Usage (from the repository root):
    .venv/bin/python benchmarks/adversarial/mutate.py --out DIR [--count 2000] [--seed 0]
        [--timeout 20] [--cli fork|subprocess] [--mem-cap-gb 4] [--sources DIR]
        [--replay ID,ID] [--max-minutes M]

1. Trains the source checkpoints (`sources.py`) into `DIR/sources` (or reuses
   `--sources`).
2. Draws `--count` seeded mutations of the sources' newest checkpoint
   (`mutations.py`); each case records its class and parameters.
3. Runs every operation of `ops.py` on each mutated file in forked workers
   with a per-operation timeout (`harness.py`): read_meta, read, list,
   inspect, inspect --json, resume, restore.
4. Writes `DIR/results.jsonl` (one case a line: spec, sha256, outcomes,
   findings), `DIR/summary.json`, keeps every case with a finding under
   `DIR/cases/`, and prints the summary table (`report.py`).

`--replay ID,...` re-makes those cases of `DIR/results.jsonl` from their
parameters alone and prints their outcomes in full.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time

import harness
import mutations
import ops
import report
import sources


def _prepare(work: str, blob: bytes, entry: dict) -> tuple[str, str]:
    """(list_dir, resume_dir): the mutated `ck-02` beside a valid copy of `ck-01`."""
    shutil.rmtree(work, ignore_errors=True)
    list_dir, resume_dir = os.path.join(work, "list"), os.path.join(work, "resume")
    os.makedirs(list_dir)
    ext = entry["ext"]
    shutil.copyfile(entry["old"], os.path.join(list_dir, sources.OLD + ext))
    with open(os.path.join(list_dir, sources.NEW + ext), "wb") as f:
        f.write(blob)
    shutil.copytree(list_dir, resume_dir)
    return list_dir, resume_dir


def _expected_name(spec: dict) -> tuple[str, str]:
    """(source, old|new) whose arrays the mutated file should read back as."""
    if spec["class"] == "other_arch":
        name, which = spec["params"]["donor"].split(":")
        return name, which
    return spec["source"], "new"


def run_case(spec: dict, manifest: dict, refs: dict, args: argparse.Namespace,
             log_fd: int | None) -> tuple[dict, bytes]:
    """Makes one mutated file, runs every operation on it; returns (record, its bytes)."""
    blob = mutations.apply(spec, manifest)
    entry = manifest[spec["source"]]
    work = os.path.join(args.work, f"case{spec['id']}")
    list_dir, resume_dir = _prepare(work, blob, entry)
    donor, which = _expected_name(spec)
    target = ops.Target(list_dir=list_dir, resume_dir=resume_dir, ext=entry["ext"],
                        kwargs=sources.checkpoint_kwargs(spec["source"]),
                        refs={"expected": refs[donor][which],
                              "older": refs[spec["source"]]["old"]},
                        cli_mode=args.cli, timeout=args.timeout)
    start = time.perf_counter()
    outcomes = harness.run_ops(list(ops.OPS), lambda op: ops.run_op(target, op), args.timeout,
                               log_fd=log_fd, mem_extra=int(args.mem_cap_gb * (1 << 30)))
    record = {**spec, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
              "seconds": round(time.perf_counter() - start, 3), "outcomes": outcomes}
    record["findings"] = report.findings(record)
    shutil.rmtree(work, ignore_errors=True)
    return record, blob


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results and sources")
    parser.add_argument("--count", type=int, default=2000, help="number of mutated files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutation RNG")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds each operation may take before it counts as a hang")
    parser.add_argument("--cli", choices=("fork", "subprocess"), default="fork",
                        help="run `python -m keras_ckpt inspect` in a fork (fast) or a real "
                             "interpreter")
    parser.add_argument("--mem-cap-gb", type=float, default=4.0,
                        help="address space a worker may add to the parent's (GiB): a memory "
                             "blow-up raises MemoryError instead of swamping the machine")
    parser.add_argument("--sources", help="reuse the source checkpoints in this directory")
    parser.add_argument("--work", default=None, help="scratch directory (default /tmp/adv/work)")
    parser.add_argument("--replay", default=None, help="re-make and re-run these case ids")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop drawing new cases after this long (the count done is said)")
    return parser.parse_args()


def _replay(args: argparse.Namespace, manifest: dict, refs: dict) -> int:
    wanted = {int(i) for i in args.replay.split(",")}
    with open(os.path.join(args.out, "results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for old in records:
        if old["id"] not in wanted:
            continue
        spec = {k: old[k] for k in ("id", "source", "class", "params")}
        record, _ = run_case(spec, manifest, refs, args, None)
        same = "same bytes" if record["sha256"] == old["sha256"] else "DIFFERENT bytes"
        print(f"case {spec['id']} ({same}): {json.dumps(spec)}")
        for op, outcome in record["outcomes"].items():
            if outcome["status"] != "ok" or report.findings({**record, "outcomes": {op: outcome}}):
                print(f"  {op}: {json.dumps(outcome, indent=None)[:1500]}")
        print(f"  findings: {record['findings']}")
    return 0


def main() -> int:
    """Runs the mutation campaign (or `--replay`); returns the exit status."""
    args = _parse()
    args.out = os.path.abspath(args.out)
    args.work = args.work or "/tmp/adv/work"
    os.makedirs(args.out, exist_ok=True)
    manifest = sources.make_sources(args.sources or os.path.join(args.out, "sources"))
    refs = {n: {w: sources.reference(e[w]) for w in ("old", "new")} for n, e in manifest.items()}
    if args.replay:
        return _replay(args, manifest, refs)
    region_map = {n: sources.regions(e["new"]) for n, e in manifest.items() if e["arch"] == "A"}
    rng = random.Random(args.seed)
    specs = [mutations.draw(rng, i, manifest, region_map) for i in range(args.count)]
    cases_dir = os.path.join(args.out, "cases")
    os.makedirs(cases_dir, exist_ok=True)
    library = harness.library_fingerprint()  # what the workers run: loaded now, then forked
    records, start = [], time.monotonic()
    with open(os.path.join(args.out, "worker.log"), "ab") as log, \
            open(os.path.join(args.out, "results.jsonl"), "w") as results:
        for spec in specs:
            if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
                print(f"stopped after {len(records)} cases (--max-minutes)", file=sys.stderr)
                break
            record, blob = run_case(spec, manifest, refs, args, log.fileno())
            records.append(record)
            results.write(json.dumps(record) + "\n")
            results.flush()
            if report.notable(record["findings"]):
                ext = manifest[spec["source"]]["ext"]
                with open(os.path.join(cases_dir, f"case{spec['id']:05d}{ext}"), "wb") as f:
                    f.write(blob)
            if len(records) % 100 == 0:
                print(f"{len(records)} cases, {time.monotonic() - start:.0f} s", file=sys.stderr,
                      flush=True)
    elapsed = time.monotonic() - start
    summary = report.summarize(records, elapsed)
    summary["command"] = " ".join(sys.argv)
    summary["library"] = library
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(report.format_summary(summary))
    print(f"library: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
