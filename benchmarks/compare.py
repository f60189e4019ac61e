"""Compare distloop at a base revision with this working tree on a benchmark, interleaved.

    python benchmarks/compare.py BASE_REV overhead.py [--rounds 15] [-- --steps 3000]
    python benchmarks/compare.py BASE_REV ddp.py [--rounds 5] [-- --steps 1000 --reps 5]

``overhead.py`` is compared in one process: the base revision's ``distloop`` package is
imported under another name (``distloop_base``, its imports rewritten), and each round
times the hand-written loop, the base ``Trainer.fit`` and this tree's ``Trainer.fit`` on
the same data, in an order that alternates. So both versions see the same machine state,
and the report gives each version's overhead per step and their paired difference.

``ddp.py`` starts processes of its own, so it is compared run against run: each round
runs the script once from a git worktree of the base revision and once from this tree
(alternating which goes first), and its CPU-based numbers (the steadier ones) are compared.

A change must not make either slower: "new" must not be worse than "base" beyond the
spread of the paired differences.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import types
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
DDP_ROWS = ("distloop, 8 metrics", "distloop, no logging")  # (b)'s rows: (extra CPU us/step, CPU-based)


def git(*args: str, cwd: str = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- overhead.py, in one process
def base_package(rev: str, into: str) -> None:
    """``distloop`` at ``rev`` as the package ``distloop_base`` under ``into``."""
    archive = subprocess.run(["git", "archive", rev, "distloop"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    os.rename(os.path.join(into, "distloop"), os.path.join(into, "distloop_base"))
    pattern = re.compile(r"^(\s*)(from|import) distloop\b", flags=re.MULTILINE)
    for folder, _, files in os.walk(os.path.join(into, "distloop_base")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(pattern.sub(r"\1\2 distloop_base", text))


def load_benchmark(package: str, tag: str) -> types.ModuleType:
    """``benchmarks/overhead.py`` (and its ``_common``) bound to the package ``package``."""
    saved = {name: sys.modules.get(name) for name in ("distloop", "_common")}
    try:
        sys.modules["distloop"] = importlib.import_module(package)
        for name in ("_common", "overhead"):
            spec = importlib.util.spec_from_file_location(f"{name}_{tag}", os.path.join(HERE, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(module)
            sys.modules[name] = module  # overhead.py imports _common by that name
        return module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def compare_overhead(base_rev: str, rounds: int, script_args: list[str]) -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    steps = parser.parse_args(script_args).steps
    with tempfile.TemporaryDirectory(prefix="distloop-base-") as tmp:
        base_package(base_rev, tmp)
        sys.path.insert(0, tmp)
        sys.path.insert(0, HERE)
        versions = {"base": load_benchmark("distloop_base", "base"), "new": load_benchmark("distloop", "new")}
        torch.set_num_threads(1)
        bench = versions["new"]
        version = bench.code_version()  # before the run: the code imported is the code measured
        data = bench.make_data(steps)
        runs: dict[str, Callable[[Any, Any, int], float]] = {
            "hand-written": bench.hand_written, "base": versions["base"].with_distloop,
            "new": versions["new"].with_distloop}
        for case, n_metrics in bench.CASES.items():  # warm-up, and a check that all do the same work
            layers = {name: bench.fresh_layer() for name in runs}
            for name, run in runs.items():
                run(layers[name], data, n_metrics)
            for name in ("base", "new"):
                assert torch.equal(layers["hand-written"].weight, layers[name].weight), (case, name)
        us: dict[tuple[str, str], list[float]] = {}
        for i in range(rounds):
            order = ["hand-written", "base", "new"] if i % 2 == 0 else ["new", "base", "hand-written"]
            for case, n_metrics in bench.CASES.items():
                for name in order:
                    us.setdefault((case, name), []).append(runs[name](bench.fresh_layer(), data, n_metrics) / steps * 1e6)
        calls = {name: calls_per_step(versions[name], bench.CASES["8 metrics"]) for name in ("base", "new")}
    print(f"distloop overhead, base vs new in one process, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.platform()}, {bench.cpu_model()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, threads=1, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"code:    base = {base_rev}; new = {version}")
    print(f"run:     {steps} steps of overhead.py's nn.Linear(32, 32) per fit; {rounds} rounds, each timing the "
          "hand-written loop, base and new (order alternating); medians\n")
    print("overhead = the version's us/step minus the hand-written loop's; 'fastest' compares each loop's fastest "
          "run (the least disturbed), 'median' their medians\n")
    print(f"{'case':<12}{'measure':<9}{'hand-written us/step':>22}{'base overhead':>15}{'new overhead':>14}"
          f"{'new - base, paired: median':>28}{'quartiles':>16}")
    for case in bench.CASES:
        diffs = [n - b for n, b in zip(us[case, "new"], us[case, "base"])]
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        for measure, of in (("median", statistics.median), ("fastest", min)):
            hand = of(us[case, "hand-written"])
            paired = f"{statistics.median(diffs):>28.1f}{f'{q1:.1f} to {q3:.1f}':>16}" if measure == "median" else ""
            print(f"{case:<12}{measure:<9}{hand:>22.1f}{of(us[case, 'base']) - hand:>15.1f}"
                  f"{of(us[case, 'new']) - hand:>14.1f}{paired}")
    print("\nfunction calls per step inside fit, 8 metrics (counted by a profile hook: exact, unlike the clock)")
    for name, (python_calls, c_calls) in calls.items():
        print(f"  {name:<5} {python_calls:7.2f} Python calls, {c_calls:7.2f} calls into C")


def calls_per_step(bench: types.ModuleType, n_metrics: int) -> tuple[float, float]:
    """Python and C calls per training step of ``with_distloop``: the difference between a
    400-step and a 200-step fit, so set-up and teardown cancel out."""
    counts = []
    for steps in (200, 400):
        count = {"call": 0, "c_call": 0}

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event in count:
                count[event] += 1

        data = bench.make_data(steps)
        sys.setprofile(profile)
        try:
            bench.with_distloop(bench.fresh_layer(), data, n_metrics)
        finally:
            sys.setprofile(None)
        counts.append(count)
    return ((counts[1]["call"] - counts[0]["call"]) / 200, (counts[1]["c_call"] - counts[0]["c_call"]) / 200)


# ---------------------------------------------------------------- ddp.py, run against run
def ddp_numbers(output: str) -> dict[str, float]:
    found = {}
    for label in DDP_ROWS:
        match = re.search(rf"^{re.escape(label)}\s+(.*)$", output, flags=re.MULTILINE)
        if match is None:
            raise SystemExit(f"compare.py: no row {label!r} in ddp.py's output:\n{output}")
        numbers = [float(n) for n in re.findall(_NUMBER, match.group(1))]
        found[f"{label}: extra CPU us/step"], found[f"{label}: CPU-based"] = numbers[5], numbers[6]
    return found


def compare_ddp(base_rev: str, rounds: int, script_args: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="distloop-base-") as tmp:
        base_tree = os.path.join(tmp, "tree")
        git("worktree", "add", "--detach", base_tree, base_rev)
        try:
            numbers: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
            for i in range(rounds):
                order = [("base", base_tree), ("new", ROOT)]
                for version, tree in order if i % 2 == 0 else order[::-1]:
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.path.join(tree, "benchmarks")])}
                    done = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "ddp.py"), *script_args],
                                          cwd=tree, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"compare.py: ddp.py in {tree} failed:\n{done.stderr[-3000:]}")
                    print(f"===== {version}, round {i + 1} =====\n{done.stdout}", flush=True)
                    numbers[version].append(ddp_numbers(done.stdout))
        finally:
            git("worktree", "remove", "--force", base_tree)
    print(f"===== ddp.py {' '.join(script_args)}: {rounds} runs of each, interleaved; base = {base_rev}, "
          "new = this tree =====")
    print(f"{'number':<48}{'base':>10}{'new':>10}   per run (base | new)")
    for name in numbers["base"][0]:
        base, new = [n[name] for n in numbers["base"]], [n[name] for n in numbers["new"]]
        print(f"{name:<48}{statistics.median(base):>10.3f}{statistics.median(new):>10.3f}   "
              f"{' '.join(f'{b:g}' for b in base)} | {' '.join(f'{n:g}' for n in new)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="the benchmark's own arguments go after --")
    parser.add_argument("base", help="the git revision to compare against (e.g. the commit before a change)")
    parser.add_argument("script", choices=("overhead.py", "ddp.py"))
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 15 for overhead.py, 5 for ddp.py)")
    argv = sys.argv[1:]
    own, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    base_rev = git("rev-parse", "--short", args.base)
    if args.script == "overhead.py":
        compare_overhead(base_rev, args.rounds or 15, script_args)
    else:
        compare_ddp(base_rev, args.rounds or 5, script_args)


if __name__ == "__main__":
    main()
