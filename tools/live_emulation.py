"""Measure how far a chapter's live reruns move when this machine takes another CPU's code paths.

The scaling chapter retrains a few runs of its record (``rotvq.lab.study.LIVE_RUNS``) and
accepts each metric within a tolerance set by the record's spread over seeds
(:func:`rotvq.lab.study.tolerance`). A machine with another CPU rounds differently. This
tool reruns the same runs here, once natively and once under each emulated code path of
``tests/test_portable.py`` (each alone and all together), and writes, for every run and
metric, the distance from the record as a fraction of the tolerance::

    python tools/live_emulation.py scaling   # writes book/records/live-emulation-scaling.json

The chapter quotes the largest fraction. Run it again whenever the record or the live
runs change (a few minutes on one core).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / "book" / "records"
#: chapter -> the records its live runs come from
SOURCES = {"scaling": ("scaling-digits.jsonl", "scaling-patches.jsonl")}
#: the settings measured: none (native), each emulation alone, all of them together
SETTINGS = {
    "native": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "all three, 3 threads": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                             "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "3",
                             "MKL_NUM_THREADS": "3"},
}


def _record(chapter: str):
    from rotvq.lab.study import Record, load_record

    return Record([r for name in SOURCES[chapter] for r in load_record(RECORDS / name).rows])


def _rows(chapter: str):
    from rotvq.lab.study import LIVE_RUNS

    record = _record(chapter)
    rows = []
    for where in LIVE_RUNS[chapter]:
        found = record.select(**where).rows
        if len(found) != 1:
            raise SystemExit(f"{where}: {len(found)} rows in the record, expected 1")
        rows.append(found[0])
    return record, rows


def worker(chapter: str) -> None:
    """Retrain the chapter's live runs in this process (its environment) and print JSON."""
    from rotvq.lab.study import retrain

    _, rows = _rows(chapter)
    print(json.dumps({row["key"]: retrain(row, row["evals"][0]) for row in rows}))


def measure(chapter: str) -> dict:
    from rotvq.lab.study import LIVE_METRICS, machine, tolerance

    record, rows = _rows(chapter)
    out = {"chapter": chapter, "command": f"python tools/live_emulation.py {chapter}",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "runs": [r["key"] for r in rows], "settings": {}}
    for name, env in SETTINGS.items():
        full = {k: v for k, v in os.environ.items() if k not in SETTINGS["all three, 3 threads"]}
        full.update(env)
        done = subprocess.run([sys.executable, __file__, chapter, "--worker"], env=full,
                              capture_output=True, text=True, check=True, cwd=ROOT)
        live = json.loads(done.stdout.strip().splitlines()[-1])
        entries = []
        for row in rows:
            step = row["evals"][0]
            for metric in LIVE_METRICS:
                recorded = row["test"][str(step)][metric]
                allowed = tolerance(record, row, metric, step)
                entries.append({"key": row["key"], "metric": metric, "record": recorded,
                                "live": live[row["key"]][metric],
                                "fraction": abs(live[row["key"]][metric] - recorded) / allowed})
        out["settings"][name] = {"env": env, "entries": entries,
                                 "worst": max(e["fraction"] for e in entries)}
        print(f"{name}: worst {out['settings'][name]['worst']:.3f} of the tolerance", file=sys.stderr)
    out["worst"] = max(s["worst"] for s in out["settings"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", choices=sorted(SOURCES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.chapter)
        return 0
    result = measure(args.chapter)
    path = RECORDS / f"live-emulation-{args.chapter}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}: worst {result['worst']:.3f} of the tolerance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
