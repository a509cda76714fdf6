"""Summarise a pytest-benchmark JSON file as a table of medians and ratios to each baseline.

Convention for every benchmark in benchmarks/: the test calls ``benchmark(...)`` after setting
``benchmark.extra_info`` to ``{"op": <op name>, "case": <shape/config string>,
"provider": <"triton", "cuda", "cupy", "torch", "torch-loop", ...>, "baseline": <bool>}``
(and optionally ``"target"``: the ratio to reach, from the README's targets, and ``"metric"``: extra figures such as
achieved bandwidth). For each (op, case) the ratio is baseline median / provider median, so > 1 means
faster than the baseline.

Usage: python benchmarks/summarize.py results.json [more.json ...] [--markdown out.md]
(several files: their rows in one table, the provenance line from the first file that exists)
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def rows_from(path):
    with open(path) as fh:
        data = json.load(fh)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        rows.append(dict(op=info["op"], case=str(info.get("case", "")),
                         provider=info.get("provider", b["name"]),
                         baseline=bool(info.get("baseline", False)),
                         target=info.get("target"), metric=info.get("metric", ""),
                         median_ms=b["stats"]["median"] * 1e3))
    return data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime", ""), rows


def table(rows):
    by_case = defaultdict(list)
    for r in rows:
        by_case[(r["op"], r["case"])].append(r)
    out = []
    for (op, case), rs in sorted(by_case.items()):
        base = [r for r in rs if r["baseline"]]
        base_ms = min(r["median_ms"] for r in base) if base else None
        for r in sorted(rs, key=lambda r: (not r["baseline"], r["provider"])):
            ratio = (base_ms / r["median_ms"]) if (base_ms and not r["baseline"]) else None
            met = ""
            if ratio is not None and r["target"]:
                met = "yes" if ratio >= float(r["target"]) else "NO"
            out.append([op, case, r["provider"] + (" (baseline)" if r["baseline"] else ""),
                        f"{r['median_ms']:.4f}", f"{ratio:.2f}x" if ratio else "",
                        f">={r['target']}x" if r["target"] else "", met, str(r["metric"])])
    return out


def render(header, body, markdown=False):
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])]
                     + [fmt.format(*row) for row in body])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--markdown", help="also write a markdown table with provenance here")
    a = ap.parse_args(argv)
    found = [p for p in a.json if os.path.exists(p)]
    if not found:
        raise SystemExit(f"none of {a.json} exists")
    machine, commit, when, rows = rows_from(found[0])
    for p in found[1:]:
        rows += rows_from(p)[3]
    header = ["op", "case", "provider", "median ms", "speed-up", "target", "met", "metric"]
    body = table(rows)
    print(render(header, body))
    if a.markdown:
        prov = machine.get("gpu", machine.get("cpu", {}).get("brand_raw", "?"))
        with open(a.markdown, "w") as fh:
            fh.write(f"Measured {when} on {prov}; versions: {machine.get('versions', {})}; "
                     f"commit {commit.get('id', '?')[:12]}\n\n")
            fh.write(render(header, body, markdown=True) + "\n")


if __name__ == "__main__":
    main()
