#!/usr/bin/env python3
"""Helpers of scripts/chaos.sh (standard library only): waiting for a run's
progress, finding rank processes by their environment, timing how long a
job takes to notice a fault, comparing metrics.jsonl with a reference
run's, recording trial results and printing the summary table.

    lib.py wait-progress RUN_DIR STEPS [--latest-file F] [--latest-is NAME] [--pid PID] [--timeout S]
    lib.py ranks TAG                       # "rank pid" lines of the job's rank processes
    lib.py tagged PREFIX                   # pids of every process whose SWITCHYARD_TEST_TAG starts with PREFIX
    lib.py monitor --t0 T --pid PID [--log F [--skip-lines N]]... [--until-gone PREFIX] [--timeout S] [--stop-on-restart]
    lib.py compare REF_METRICS RUN_METRICS [--exact-through STEP] [--rel-tol X]
    lib.py record RESULTS_JSONL key=value ...   # value parsed as JSON when it parses, else a string
    lib.py summary OUT_DIR                 # table on stdout, OUT_DIR/summary.md; exit 1 when a trial failed
"""

import json
import os
import re
import sys
import time

# Fields of a metrics.jsonl row that depend only on the math (not on timing):
# the ones compared with the reference run, as the exact text of each number.
COMPARED = ["step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_expert", "dropped"]

# Lines that show the job noticed a fault (first one timed as "noticed").
NOTICE = re.compile(
    r"is lost|lost the coordinator|timed out|never arrived|stopping every rank|stopped on SIG|"
    r"SIGTERM|failed|error:|retryable|MPI_ABORT|exited on signal|restart \d+/\d+"
)
RESTART = re.compile(r"restart \d+/\d+: (resuming from step (\d+)|no checkpoint was committed yet)")


def read_lines(path):
    try:
        with open(path, "r", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def alive(pid):
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def tagged(prefix):
    """Live processes whose SWITCHYARD_TEST_TAG starts with prefix (not this one)."""
    want = b"SWITCHYARD_TEST_TAG=" + prefix.encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if any(v.startswith(want) for v in environ(name)) and alive(name):
            out.append(int(name))
    return sorted(out)


def ranks(tag):
    """{rank: pid} of the switchyard rank processes of the job tagged `tag`."""
    want = b"SWITCHYARD_TEST_TAG=" + tag.encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        env = environ(name)
        if want not in env or not comm(name).startswith("switchyard") or not alive(name):
            continue
        for v in env:
            if v.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(v.split(b"=", 1)[1])] = int(name)
    return found


def arg(args, name, default=None, many=False):
    vals = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    if many:
        return vals
    return vals[-1] if vals else default


def cmd_wait_progress(args):
    run_dir, steps = args[0], int(args[1])
    latest_file = arg(args, "--latest-file")
    latest_is = arg(args, "--latest-is")
    pid = arg(args, "--pid")
    timeout = float(arg(args, "--timeout", "180"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while True:
        n = len(read_lines(metrics))
        latest = (read_lines(latest_file) or [""])[0].strip() if latest_file else ""
        ok = n >= steps and (not latest_file or (latest if latest_is is None else latest == latest_is))
        if ok:
            print(n)
            return 0
        if pid and not alive(pid):
            print(f"the job ended before step {steps} (at {n} steps, latest {latest or 'none'})", file=sys.stderr)
            return 2
        if time.time() > deadline:
            print(f"timed out after {timeout}s waiting for step {steps} (at {n}, latest {latest or 'none'})", file=sys.stderr)
            return 1
        time.sleep(0.01)


def cmd_monitor(args):
    """Watches a job after a fault at time --t0 until its process --pid ends
    (and, with --until-gone, every process tagged PREFIX is gone), or
    --timeout seconds after t0. Prints JSON: seconds from t0 to the first
    line in the logs that shows the fault was noticed, to the restart line,
    to the end of the pid, to the end of every tagged process; timed_out."""
    t0 = float(arg(args, "--t0"))
    pid = arg(args, "--pid")
    logs = arg(args, "--log", many=True)
    gone = arg(args, "--until-gone")
    timeout = float(arg(args, "--timeout", "180"))
    stop_on_restart = "--stop-on-restart" in args
    seen = {log: 0 for log in logs}
    skip = arg(args, "--skip-lines", many=True)
    for log, n in zip(logs, skip):
        seen[log] = int(n)
    res = {"noticed_s": None, "notice": None, "restart_s": None, "restart": None, "exit_s": None, "gone_s": None,
           "timed_out": False}
    while True:
        now = time.time()
        for log in logs:
            lines = read_lines(log)
            for line in lines[seen[log]:]:
                if res["noticed_s"] is None and NOTICE.search(line):
                    res["noticed_s"], res["notice"] = round(now - t0, 3), line[:300]
                m = RESTART.search(line)
                if m and res["restart_s"] is None:
                    res["restart_s"], res["restart"] = round(now - t0, 3), line[:300]
            seen[log] = len(lines)
        if res["exit_s"] is None and (pid is None or not alive(pid)):
            res["exit_s"] = round(now - t0, 3)
        if res["exit_s"] is not None and res["gone_s"] is None and (gone is None or not tagged(gone)):
            res["gone_s"] = round(now - t0, 3)
        if res["exit_s"] is not None and res["gone_s"] is not None:
            break
        if stop_on_restart and res["restart_s"] is not None:
            break
        if now - t0 > timeout:
            res["timed_out"] = True
            break
        time.sleep(0.02)
    print(json.dumps(res))
    return 0


def load_metrics(path):
    rows = []
    for line in read_lines(path):
        if line.strip():
            rows.append(json.loads(line, parse_float=str, parse_int=str))
    return rows


def cmd_compare(args):
    """Compares a run's metrics.jsonl with the reference's: every step once,
    in order, and the COMPARED fields as exact number text (bit-identical
    f64s), or, after --exact-through STEP, within --rel-tol (a resume on
    another layout). Prints JSON."""
    ref, run = load_metrics(args[0]), load_metrics(args[1])
    exact_through = int(arg(args, "--exact-through", "-1"))
    rel_tol = float(arg(args, "--rel-tol", "0"))
    res = {"steps": len(run), "ref_steps": len(ref), "in_order": True, "identical": True, "within_tol": True,
           "first_diff": None, "max_rel_diff": 0.0}
    steps = [int(r.get("step", "-1")) for r in run]
    if steps != list(range(1, len(ref) + 1)):
        res["in_order"] = False
        res["identical"] = res["within_tol"] = False
        res["first_diff"] = f"steps {steps[:3]}...{steps[-3:]} (len {len(steps)}), want 1..{len(ref)}"
    for a, b in zip(ref, run):
        step = int(a["step"])
        for key in COMPARED:
            if a.get(key) == b.get(key):
                continue
            if res["first_diff"] is None:
                res["first_diff"] = f"step {step} {key}: {b.get(key)} vs reference {a.get(key)}"
            res["identical"] = False
            if key in ("loss", "aux_loss", "z_loss", "grad_norm", "lr"):
                x, y = float(a[key]), float(b[key])
                rel = abs(x - y) / max(abs(x), 1e-30)
                res["max_rel_diff"] = max(res["max_rel_diff"], rel)
                if step <= exact_through or rel > rel_tol:
                    res["within_tol"] = False
            elif key != "tokens_per_expert" or step <= exact_through:
                # Routing counts may differ on another layout; nothing else may.
                res["within_tol"] = False
    print(json.dumps(res))
    return 0


def cmd_record(args):
    path, pairs = args[0], args[1:]
    rec = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            rec[key] = json.loads(value)
        except ValueError:
            rec[key] = value
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def fmt_s(x):
    return "—" if x is None else f"{x:.1f}"


def cmd_summary(args):
    out = args[0]
    results = [json.loads(l) for l in read_lines(os.path.join(out, "results.jsonl")) if l.strip()]
    meta = {}
    for l in read_lines(os.path.join(out, "faults.jsonl")):
        if l.strip():
            m = json.loads(l)
            meta[m["fault"]] = m
    order = list(meta) + [r["fault"] for r in results if r["fault"] not in meta]
    order = list(dict.fromkeys(order))
    header = ["fault", "what it does", "resumed by", "trials", "finished, losses as expected", "commit lost",
              "hung", "noticed (median / max s)", "detection (median / max s)", "outcomes"]
    rows = []
    failed = False
    for fault in order:
        rs = [r for r in results if r["fault"] == fault]
        m = meta.get(fault, {})
        if m.get("not_run"):
            failed = True
            rows.append([fault, m.get("what", ""), m.get("resume", ""), "0", "not run", "—", "—", "—", "—",
                         "NOT RUN: " + m["not_run"]])
            continue
        missed = [r for r in rs if r.get("missed")]
        done = [r for r in rs if not r.get("missed")]
        good = sum(1 for r in done if r.get("losses_ok"))
        lost = sum(1 for r in done if r.get("commit_lost"))
        hung = sum(1 for r in done if r.get("hung"))
        det = [r["detect_s"] for r in done if isinstance(r.get("detect_s"), (int, float))]
        noticed = [r["noticed_s"] for r in done if isinstance(r.get("noticed_s"), (int, float))]
        outcomes = {}
        for r in done:
            outcomes[r.get("outcome", "?")] = outcomes.get(r.get("outcome", "?"), 0) + 1
        text = "; ".join(f"{k} ×{v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
        if missed:
            text += f"; fault missed (job already past it) ×{len(missed)}"
        expected = m.get("expect", "identical")
        rows.append([
            fault, m.get("what", ""), m.get("resume", ""), str(len(done)),
            f"{good}/{len(done)}" + ("" if expected == "identical" else f" ({expected})"),
            str(lost), str(hung),
            f"{fmt_s(median(noticed))} / {fmt_s(max(noticed) if noticed else None)}",
            f"{fmt_s(median(det))} / {fmt_s(max(det) if det else None)}",
            text or "—",
        ])
        if lost or hung or good < len(done):
            failed = True
    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4 + ["---:", "---:", "---"]) + "|"]
    md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    failing = [r for r in results if not r.get("missed") and not r.get("ok")]
    notes = []
    if failing:
        notes.append("")
        notes.append("Failed trials:")
        for r in failing:
            notes.append(f"- {r['fault']} trial {r['trial']}: {r.get('why', '')} ({r.get('dir', '')})")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md + notes) + "\n")
    # Console: a narrower table (no description columns).
    keep = [0, 3, 4, 5, 6, 7, 8, 9]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in keep]
    widths[-1] = min(widths[-1], 200)
    print("  ".join(header[i].ljust(w) for i, w in zip(keep, widths)))
    for r in rows:
        print("  ".join(r[i].ljust(w) for i, w in zip(keep, widths)))
    for n in notes:
        print(n)
    return 1 if failed else 0


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wait-progress":
        return cmd_wait_progress(args)
    if cmd == "ranks":
        for rank, pid in sorted(ranks(args[0]).items()):
            print(rank, pid)
        return 0
    if cmd == "tagged":
        print(" ".join(map(str, tagged(args[0]))))
        return 0
    if cmd == "monitor":
        return cmd_monitor(args)
    if cmd == "compare":
        return cmd_compare(args)
    if cmd == "record":
        return cmd_record(args)
    if cmd == "summary":
        return cmd_summary(args)
    print(f"unknown command {cmd}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
