"""The benchmark of issue 4: every job on every target, one table, one JSON file.

Usage (as root: cold reads drop the kernel page cache)::

    python bench/run.py [--size-mib 2048] [--files 10000] [--targets local,nimbus,...]

Targets: ``local`` (a directory on local disk), ``nimbus`` (nimbusfs, local
block store), ``nimbus-wb`` (the same, write-back), ``nimbus-gcs`` (nimbusfs,
blocks in the GCS emulator, ``--sync``), ``nimbus-gcs-wb`` (the same, write-back), ``rclone``
and ``rclone-gcs`` (``rclone mount --vfs-cache-mode full`` over a local
directory / the emulator), ``raw-gcs`` (the google-cloud-storage client alone,
on the emulator, with the mount's transfer parallelism). Each target is set up,
runs every job, and is torn down before the next one starts. Prints a markdown
table (metrics as rows, targets as columns) and writes
``bench/results/bench-TIMESTAMP.json``.

The ``api`` job (``api.py``, the REST issue's benchmark) runs on the nimbusfs
targets only, against the metaserver behind the mount: ``--jobs seq,api
--size-mib 1024`` puts the HTTP API's figures beside the mount's sequential
ones of the same run, on the same machine and load (the load average at the
end of the run is in the title: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack

import jobs
from api import api
from gcs import MOUNT_TRANSFERS, emulator, raw_baseline
from harness import ROOT, print_table, save_json
from targets import KINDS, NAMES, open_target

ALL = (*KINDS, "raw-gcs")
JOBS = ("seq", "rand", "files", "dedup", "tree", "api")
CACHE = os.path.join(ROOT, "bench", "cache")
DJANGO = "Django==5.1.4"   # a large sdist: 10,042 entries (6,809 files, 3,233 directories)


def default_tarball() -> str:
    """The Django sdist in ``bench/cache`` (downloaded once with pip)."""
    name, version = DJANGO.split("==")
    path = os.path.join(CACHE, f"{name}-{version}.tar.gz")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", name, "-d", CACHE, DJANGO], check=True)
    return path


def fmt(v: float | str) -> str:
    if isinstance(v, str | int):
        return str(v)
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def run_target(kind: str, args: argparse.Namespace, emu, tarball: str, repo: str,
               errors: list[str]) -> dict[str, float | str]:
    """All jobs on one target; a failing job is recorded and the others still run."""
    out: dict[str, float | str] = {}
    with open_target(kind, emu) as t:
        print(f"== {t.name} ({t.root})", file=sys.stderr, flush=True)
        steps: list[tuple[str, Callable[[], dict]]] = [
            ("seq", lambda: jobs.sequential(t, args.size_mib)),
            ("rand", lambda: jobs.random_io(t, args.rand_mib, args.rand_seconds)),
            ("files", lambda: jobs.small_files(t, args.files)),
        ]
        rss = [("rss", lambda: {"mount peak RSS MiB (jobs 1-3)": t.peak_rss_mib()})]
        later: list[tuple[str, Callable[[], dict]]] = [
            ("dedup", lambda: jobs.dedup(t, args.dedup_mib)),
            ("tree", lambda: jobs.trees(t, tarball, repo)),
            ("api", lambda: api(t, args.api_mib)),
        ]
        for job, fn in [*steps, *rss, *later]:
            if job not in args.jobs and not (job == "rss" and {"seq", "rand", "files"}
                                              & set(args.jobs)):
                continue
            t0 = time.monotonic()
            try:
                res = fn()
            except (Exception, SystemExit):  # nimbusfs() exits on a failed command
                errors.append(f"{t.name} / {job}:\n{traceback.format_exc()}")
                print(errors[-1], file=sys.stderr)
                continue
            out.update({k: v for k, v in res.items() if v is not None})
            print(f"   {job}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        if "dedup" in args.jobs and t.stored_bytes() is not None:
            out["dedup: upload measured by"] = t.upload_source
        return out


def add_raw_ratios(results: dict[str, dict[str, float | str]]) -> None:
    """Rows comparing the GCS targets' sequential transfer with the raw client's."""
    raw = next((r for n, r in results.items() if n.startswith("raw GCS")), None)
    if not raw:
        return
    for name, r in results.items():
        if "GCS emulator" not in name:
            continue
        # rclone's close returns before its upload: compare the time until uploaded
        w = r.get("seq write until uploaded MB/s", r.get("seq write+fsync MB/s"))
        c = r.get("seq read cold MB/s")
        pct = {}
        if isinstance(w, float):
            pct["seq write (until uploaded), % of raw GCS upload"] = (
                100 * w / raw["seq write+fsync MB/s"])  # type: ignore[operator]
        if isinstance(c, float):
            pct["seq read cold, % of raw GCS download"] = (
                100 * c / raw["seq read cold MB/s"])  # type: ignore[operator]
        items = list(r.items())
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "seq read warm MB/s"),
                  len(items))
        r.clear()
        r.update([*items[:at], *pct.items(), *items[at:]])


def metric_order(results: dict[str, dict[str, float | str]]) -> list[str]:
    """Every metric once; one only some targets have goes after its predecessor there."""
    order: list[str] = []
    for r in results.values():
        prev = None
        for k in r:
            if k not in order:
                order.insert(order.index(prev) + 1 if prev else len(order), k)
            prev = k
    return order


def render(data: dict) -> None:
    """Print the markdown table of a run (as saved in its JSON)."""
    args, results = data["args"], data["results"]
    rows = [[m, *(fmt(results[t][m]) if m in results[t] else "-" for t in results)]
            for m in metric_order(results)]
    api = f", {args['api_mib']} MiB over the API" if "api" in args["jobs"] else ""
    load = (", load average " + " / ".join(f"{x:.1f}" for x in data["loadavg"])
            + " (1/5/15 min)" if "loadavg" in data else "")
    print_table(f"nimbusfs benchmark ({args['size_mib']} MiB sequential, {args['rand_mib']} "
                f"MiB random x {args['rand_seconds']} s, {args['files']} small files, "
                f"{args['dedup_mib']} MiB dedup{api}; {data['machine']}, {data['cpus']} cores"
                f"{load}, {data['date']})", ["metric", *results], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(ALL),
                    help=f"comma-separated, from {','.join(ALL)} (default: all)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"from {','.join(JOBS)}")
    ap.add_argument("--size-mib", type=int, default=2048,
                    help="sequential file and raw GCS baseline size (issue: 2048)")
    ap.add_argument("--rand-mib", type=int, help="random I/O file (issue: 1024)")
    ap.add_argument("--rand-seconds", type=int, default=20, help="fio runtime of each job")
    ap.add_argument("--dedup-mib", type=int, help="dedup file (issue: 1024)")
    ap.add_argument("--api-mib", type=int,
                    help="file moved through the HTTP API (REST issue: 1024)")
    ap.add_argument("--files", type=int, default=10_000, help="small files (issue: 10000)")
    ap.add_argument("--tarball", help=f"source tarball to extract (default: {DJANGO} sdist)")
    ap.add_argument("--repo-commits", type=int, default=500,
                    help="commits of the generated repository cloned by git")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            render(json.load(f))
        return
    args.rand_mib = args.rand_mib or min(1024, args.size_mib)
    args.dedup_mib = args.dedup_mib or min(1024, args.size_mib)
    args.api_mib = args.api_mib or min(1024, args.size_mib)
    args.targets = [k.strip() for k in args.targets.split(",") if k.strip()]
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    for bad in set(args.targets) - set(ALL):
        ap.error(f"unknown target {bad!r}")
    for bad in set(args.jobs) - set(JOBS):
        ap.error(f"unknown job {bad!r}")
    if os.geteuid() != 0:
        ap.error("run as root: cold reads drop the kernel page cache")

    tarball = repo = ""
    if "tree" in args.jobs:
        tarball = os.path.abspath(args.tarball or default_tarball())
        base = os.path.basename(tarball).split(".tar")[0]
        repo = jobs.make_repo(tarball, os.path.join(CACHE, f"{base}-{args.repo_commits}.git"),
                              args.repo_commits)

    results: dict[str, dict[str, float | str]] = {}
    errors: list[str] = []
    with ExitStack() as stack:
        emu = None
        if any(k.endswith("gcs") for k in args.targets):
            emu = stack.enter_context(emulator(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="nimbus-bench-gcs-", dir="/var/tmp"))))
        for kind in args.targets:
            if kind == "raw-gcs":
                raw = raw_baseline(emu, args.size_mib)
                results[f"raw GCS client ({MOUNT_TRANSFERS} parallel)"] = {
                    "seq write+fsync MB/s": raw["upload MB/s"],
                    "seq read cold MB/s": raw["download MB/s"]}
                continue
            try:
                results[NAMES[kind]] = run_target(kind, args, emu, tarball, repo, errors)
            except (Exception, SystemExit):  # nimbusfs() exits on a failed command
                errors.append(f"{kind} (setup/teardown):\n{traceback.format_exc()}")
                print(errors[-1], file=sys.stderr)

    add_raw_ratios(results)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    data = {"args": vars(args), "date": stamp, "machine": platform.node(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "mount_transfers": MOUNT_TRANSFERS,
            "results": results, "errors": errors}
    path = save_json(f"bench-{stamp}", data)
    render(data)
    print("\nJSON:", path)
    if errors:
        print(f"\n{len(errors)} job(s) failed:\n\n" + "\n".join(errors))
        sys.exit(1)


if __name__ == "__main__":
    main()
