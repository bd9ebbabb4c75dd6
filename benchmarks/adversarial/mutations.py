"""Seeded mutations of checkpoint files, each fully described by its parameters.

`draw(rng, ...)` picks a class and resolves every random choice into plain
parameters (offsets, bits, lengths, donor files, garbage seeds); `apply(spec,
manifest)` re-makes the mutated bytes from a spec alone, so a case in
`results.jsonl` can be re-made without the RNG.

Classes: `bitflip`, `multiflip`, `truncate`, `zero_page` (a 4 KiB page),
`append` (garbage after the end), `splice` (a byte range from another
checkpoint), `other_arch` (the whole file of a model with other layers),
`zip_member` (`.keras` only: re-zipped with one member damaged or dropped, so
the zip's own CRCs are right) and `none` (an unmodified control).
"""

from __future__ import annotations

import functools
import io
import random
import zipfile

PAGE = 4096
WEIGHTS = {"bitflip": 20, "multiflip": 12, "truncate": 12, "zero_page": 12, "append": 8,
           "splice": 14, "other_arch": 5, "zip_member": 15, "none": 2}
MEMBER_OPS = ("bitflip", "truncate", "zero", "append", "drop")


@functools.lru_cache(maxsize=64)
def _read(path: str) -> bytes:
    """A source file's bytes (sources never change during a run)."""
    with open(path, "rb") as f:
        return f.read()


def _donor_path(manifest: dict, donor: str) -> str:
    name, which = donor.split(":")
    return manifest[name][which]


def _offset(rng: random.Random, size: int, regions: dict) -> tuple[str, int]:
    """A byte offset: uniform over the file, or inside a region worth aiming at."""
    region = rng.choice(["any", "any", *sorted(regions)])
    if region == "any":
        return region, rng.randrange(size)
    lo, hi = rng.choice(regions[region])
    return region, rng.randrange(lo, max(lo + 1, min(hi, size)))


def _draw_params(rng: random.Random, cls: str, blob: bytes, regions: dict, donors: list,
                 others: list, members: list) -> dict:
    size = len(blob)
    if cls == "bitflip":
        region, offset = _offset(rng, size, regions)
        return {"region": region, "flips": [[offset, rng.randrange(8)]]}
    if cls == "multiflip":
        region, offset = _offset(rng, size, regions)
        spread = rng.choice([16, 512, size])
        flips = sorted({(min(size - 1, max(0, offset + rng.randrange(-spread, spread))),
                         rng.randrange(8)) for _ in range(rng.randint(2, 16))})
        return {"region": region, "flips": [list(f) for f in flips]}
    if cls == "truncate":
        tail = rng.random() < 0.3
        length = size - rng.randint(1, 64) if tail else rng.randrange(size)
        return {"length": max(0, length)}
    if cls == "zero_page":
        return {"offset": PAGE * rng.randrange(-(-size // PAGE)), "length": PAGE}
    if cls == "append":
        return {"length": rng.choice([1, 7, 512, PAGE, 65536]),
                "kind": rng.choice(["random", "zeros", "self"]),
                "seed": rng.randrange(2 ** 32)}
    if cls == "splice":
        donor = rng.choice(donors)
        donor_size = donor[1]
        length = rng.choice([8, 64, 512, PAGE])
        src = rng.randrange(max(1, donor_size - length))
        dst = src if rng.random() < 0.5 and src < size else rng.randrange(size)
        return {"donor": donor[0], "src": src, "dst": dst, "length": length}
    if cls == "other_arch":
        return {"donor": rng.choice(others)}
    if cls == "zip_member":
        name, member_size = rng.choice(members)
        op = rng.choice(MEMBER_OPS)
        params = {"member": name, "op": op,
                  "compress": rng.choice(["stored", "deflated"]), "seed": rng.randrange(2 ** 32)}
        if op == "bitflip":
            params["flips"] = [[rng.randrange(max(1, member_size)), rng.randrange(8)]]
        elif op == "truncate":
            params["length"] = rng.randrange(max(1, member_size))
        elif op == "zero":
            params["offset"] = rng.randrange(max(1, member_size))
            params["length"] = rng.choice([16, 512, PAGE])
        elif op == "append":
            params["length"] = rng.choice([1, 512, PAGE])
        return params
    return {}


def draw(rng: random.Random, case_id: int, manifest: dict, region_map: dict) -> dict:
    """One case: `{"id", "source", "class", "params"}` (targets: architecture `A`)."""
    targets = sorted(n for n, e in manifest.items() if e["arch"] == "A")
    source = rng.choice(targets)
    entry = manifest[source]
    ext = entry["ext"]
    classes = [c for c in WEIGHTS if c != "zip_member" or ext == ".keras"]
    cls = rng.choices(classes, weights=[WEIGHTS[c] for c in classes])[0]
    blob = _read(entry["new"])
    same_ext = [(f"{n}:{w}", len(_read(e[w]))) for n, e in sorted(manifest.items())
                if e["ext"] == ext for w in ("old", "new") if (n, w) != (source, "new")]
    others = [f"{n}:{w}" for n, e in sorted(manifest.items())
              if e["arch"] != "A" and e["ext"] == ext for w in ("old", "new")]
    members = []
    if ext == ".keras":
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            members = [(i.filename, i.file_size) for i in archive.infolist()]
    params = _draw_params(rng, cls, blob, region_map[source], same_ext, others, members)
    return {"id": case_id, "source": source, "class": cls, "params": params}


def _flip(blob: bytes, flips: list) -> bytes:
    data = bytearray(blob)
    for offset, bit in flips:
        if offset < len(data):
            data[offset] ^= 1 << bit
    return bytes(data)


def _garbage(length: int, kind: str, seed: int, blob: bytes) -> bytes:
    if kind == "zeros":
        return bytes(length)
    if kind == "self":
        return (blob * (length // max(1, len(blob)) + 1))[:length]
    return random.Random(seed).randbytes(length)


def _zeroed(blob: bytes, offset: int, length: int) -> bytes:
    end = min(len(blob), offset + length)
    return blob[:offset] + bytes(end - offset) + blob[end:]


def _member_bytes(body: bytes, p: dict) -> bytes:
    op = p["op"]
    if op == "bitflip":
        return _flip(body, p["flips"])
    if op == "truncate":
        return body[:p["length"]]
    if op == "zero":
        return _zeroed(body, p["offset"], p["length"])
    return body + _garbage(p["length"], "random", p["seed"], body)


def _rezip(blob: bytes, p: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            compress = info.compress_type
            if info.filename == p["member"]:
                if p["op"] == "drop":
                    continue
                body = _member_bytes(body, p)
                compress = zipfile.ZIP_DEFLATED if p["compress"] == "deflated" \
                    else zipfile.ZIP_STORED
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.compress_type = compress
            dst.writestr(new, body)
    return out.getvalue()


def apply(spec: dict, manifest: dict) -> bytes:
    """The mutated bytes of `spec`'s case (deterministic: parameters only)."""
    blob = _read(manifest[spec["source"]]["new"])
    cls, p = spec["class"], spec["params"]
    if cls in ("bitflip", "multiflip"):
        return _flip(blob, p["flips"])
    if cls == "truncate":
        return blob[:p["length"]]
    if cls == "zero_page":
        return _zeroed(blob, p["offset"], p["length"])
    if cls == "append":
        return blob + _garbage(p["length"], p["kind"], p["seed"], blob)
    if cls == "splice":
        donor = _read(_donor_path(manifest, p["donor"]))
        piece = donor[p["src"]:p["src"] + p["length"]]
        piece = piece[:max(0, len(blob) - p["dst"])]
        return blob[:p["dst"]] + piece + blob[p["dst"] + len(piece):]
    if cls == "other_arch":
        return _read(_donor_path(manifest, p["donor"]))
    if cls == "zip_member":
        return _rezip(blob, p)
    return blob
