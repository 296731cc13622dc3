"""`make bench`: run every bench/ script, merge their JSON into bench/results/<machine>.json and
their printed tables into bench/results/<machine>.md (the summary the README shows).

    python bench/run_all.py                  # CPU: about an hour on 2 cores (batch, static and live take most)
    python bench/run_all.py --device cuda    # GPU: 7B-shaped LLaVA in bf16
    python bench/run_all.py --only visionzip stream   # re-run these; the others' last results stay
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, machine_name  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (script, CPU arguments, GPU arguments).
SUITES = {
    "visionzip": ("visionzip_bench.py", ["--batch", "2", "--lm-layers", "2", "--repeats", "2"],
                  ["--batch", "1", "8", "32", "--lm-layers", "32", "--repeats", "10"]),
    "decode": ("decode_bench.py", ["--seconds", "10", "--repeat", "1"], ["--seconds", "20"]),
    "ingest": ("ingest_bench.py", ["--frames", "8"], ["--frames", "64", "--sessions", "1", "4", "8", "16"]),
    "stream": ("stream_bench.py", ["--asks", "2", "--repeats", "3"], ["--lm", "7b"]),
    "batch": ("batch_bench.py", ["--sessions", "1", "2", "4", "8", "16"],
              ["--lm", "7b", "--tower", "vit-l", "--sessions", "1", "4", "16", "64", "--budget", "4096"]),
    "static": ("static_bench.py", [], []),
    "live": ("live_bench.py", ["--minutes", "3"], []),  # the 10-minute figure: python bench/live_bench.py
    "serve": ("serve_bench.py", [], []),
    "quality": ("quality_bench.py", [], []),
}


def run_suite(name, script, extra, device, tmp) -> dict:
    out = os.path.join(tmp, f"{name}.json")
    if name == "quality":  # writes quality.json/.md/.png into a folder: keep them (the plot) in results/
        cmd = [sys.executable, os.path.join(HERE, script), "--out", RESULTS, *extra]
        out = os.path.join(RESULTS, "quality.json")
    else:
        cmd = [sys.executable, os.path.join(HERE, script), "--out", out, *extra]
    if name in ("visionzip", "stream", "ingest", "batch"):
        cmd += ["--device", device]
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.time() - t
    print(proc.stdout[-6000:], flush=True)
    shown = " ".join(["python", *cmd[1:]]).replace(tmp + "/", "").replace(os.path.dirname(HERE) + "/", "")
    result = {"command": shown, "seconds": round(took, 1),
              "returncode": proc.returncode, "stdout": proc.stdout}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    if os.path.exists(out):
        with open(out) as f:
            result["result"] = json.load(f)
    return result


def tables(stdout: str) -> str:
    """The Markdown tables (and their caption lines) a bench script printed."""
    keep = [line for line in stdout.splitlines() if line.startswith("|") or line.strip().endswith(":")
            or line.startswith(("VisionZip", "Prefill", "Decode", "Stream", "Serve", "Quality", "Long"))]
    return "\n".join(keep)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", choices=list(SUITES))
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    name = machine_name(args.device)
    report = {"machine": machine(args.device), "date": now(), "suites": {}}
    path = os.path.join(RESULTS, f"{name}.json")
    if args.only and os.path.exists(path):  # a partial run updates the summary instead of replacing it
        with open(path) as f:
            old = json.load(f)
        report["suites"] = {k: {"date": old["date"], **v} for k, v in old["suites"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        for suite in args.only or SUITES:
            script, cpu_args, gpu_args = SUITES[suite]
            if not os.path.exists(os.path.join(HERE, script)):
                print(f"skip {suite}: {script} missing")
                continue
            report["suites"][suite] = run_suite(suite, script, gpu_args if gpu else cpu_args, args.device, tmp)
            report["suites"][suite]["date"] = now()
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    md = [f"# streamvz bench: {name}", "",
          f"Date {report['date']}, machine {report['machine']}, command `python bench/run_all.py"
          f"{' --device ' + args.device if gpu else ''}"
          f"{' --only ' + ' '.join(args.only) + '` (other suites: the date shown with each)' if args.only else '`'}.", ""]
    for suite, r in report["suites"].items():
        status = "" if r["returncode"] == 0 else f" (FAILED, exit {r['returncode']})"
        when = f", {r['date'][:10]}" if "date" in r else ""
        md += [f"## {suite}{status}", "", f"`{r['command']}` ({r['seconds']} s{when})", "", tables(r["stdout"]), ""]
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write("\n".join(md))
    total = sum(r["seconds"] for r in report["suites"].values())
    print(f"\nwrote bench/results/{name}.json and .md ({total:.0f} s)")
    sys.exit(0 if all(r["returncode"] == 0 for r in report["suites"].values()) else 1)


if __name__ == "__main__":
    main()
