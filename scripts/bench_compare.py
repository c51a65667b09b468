#!/usr/bin/env python3
"""Reads the JSON lines of a model benchmark run (scripts/bench_model.sh writes them: one
object per system from `edgetune bench --model M --json` and scripts/llama_cpp_peer.py
--json) and prints each system's tests with its ratio to llama.cpp in the same run, marking
ratios below the speed issue's goals; given an earlier run first, also the change per test,
marking slowdowns of more than 10%. Exits 1 if anything is marked.

Usage: python3 scripts/bench_compare.py [BASELINE.jsonl] RUN.jsonl
"""
import json
import sys

# Goals of the speed issue, as ratios to llama.cpp's CPU path with the same threads.
GOALS = {
    "host": {"pp": 0.5, "tg": 0.5, "train": 0.5},
    "lavapipe": {"pp": 0.42, "tg": 0.23, "train": 0.42},
}
SLOWDOWN = 0.10


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def kind(system):
    # llama.cpp is the peer for prompt, generation and the training-shape forward;
    # PyTorch MeZO for the zeroth-order step (zoBxT), PyTorch + PEFT for the backprop step
    # (bpBxT).
    if system.startswith("llama.cpp") or system.startswith("PyTorch"):
        return "peer"
    if "llvmpipe" in system or "lavapipe" in system:
        return "lavapipe"
    if system.startswith("edgetune cpu,"):
        return "host"
    return "other"


def family(test):
    return test.rstrip("0123456789x").rstrip("x")


def rates(run):
    return {(s["system"], r["test"]): r for s in run for r in s["rows"]}


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    run = load(argv[-1])
    base = rates(load(argv[1])) if len(argv) == 3 else {}
    peer = {r["test"]: r["tok_s"] for s in run if kind(s["system"]) == "peer" for r in s["rows"]}
    if run and "cpu" in run[0]:
        print(f"cpu: {run[0]['cpu']}; flags: {' '.join(run[0].get('cpu_flags', []))}")
    for s in run:
        if s.get("kernel_shapes"):
            print(f"{s['system']}: kernel shapes {s['kernel_shapes']}")
    marked = 0
    print(f"{'system':<44} {'test':<12} {'tok/s':>9} {'peak MiB':>9} {'vs peer':>13} {'vs baseline':>12}")
    for s in run:
        goals = GOALS.get(kind(s["system"]), {})
        for r in s["rows"]:
            notes = []
            ratio = ""
            if kind(s["system"]) != "peer" and r["test"] in peer:
                x = r["tok_s"] / peer[r["test"]]
                ratio = f"{x:.2f}x"
                goal = goals.get(family(r["test"]))
                if goal is not None and x < goal:
                    notes.append(f"below the {goal}x goal")
            change = ""
            old = base.get((s["system"], r["test"]))
            if old:
                d = r["tok_s"] / old["tok_s"] - 1
                change = f"{d:+.1%}"
                if d < -SLOWDOWN:
                    notes.append(f"slower than baseline by more than {SLOWDOWN:.0%}")
            marked += bool(notes)
            peak = r.get("peak_rss_mib")
            print(f"{s['system'][:44]:<44} {r['test']:<12} {r['tok_s']:>9.2f} "
                  f"{(f'{peak:.0f}' if peak else '-'):>9} {ratio:>13} {change:>12}"
                  + ("   <- " + "; ".join(notes) if notes else ""))
    if marked:
        print(f"{marked} result(s) marked")
    return 1 if marked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
