"""Long fuzz runs of the boundary decoders: >= 1,000,000 inputs each, outside CI.

Run from the repository root (nice it: it keeps one core busy per target, one at a time)::

    nice python3 -m benchmarks.fuzz_many --crashes /tmp/fuzz-crashes
    nice python3 -m benchmarks.fuzz_many --targets codec,manifest --count 1000000 \\
        --crashes /tmp/fuzz-crashes --engine mutate

Targets (tests/fuzz/targets.py; the same oracles the CI-sized tests in tests/fuzz use):
``codec`` (codec.decode for every registered record and boundary union), ``gossip``
(keyring.open + the SWIM core's receive paths), ``frames`` (Raft FrameReader + decode),
``manifest`` (parse_manifests), ``http`` (the node API's h11 connection loop).

Engines. ``atheris`` (Google's coverage-guided libFuzzer for Python; ``pip install
p2porch[fuzz]``) instruments the Python code and keeps inputs that reach new branches.
``mutate`` is a plain loop of our own: it mutates the targets' valid seeds (byte edits,
msgpack-structure edits, YAML token edits) with no coverage feedback -- weaker at finding
deep paths, but needs nothing and runs faster. ``auto`` picks atheris when it imports.

Each target runs in its own child process (so a real crash or an out-of-memory kill is
reported, not inherited); the parent prints, per target: inputs run, inputs/s, crashes (an
oracle violation or an unexpected exception; each distinct one saved under ``--crashes`` as
``<target>-<kind>-<sha1>.bin`` with a ``.txt`` traceback next to it), and the child's peak
RSS. The child's stderr (libFuzzer progress) is in ``<crashes>/<target>.stderr``. A
reproducer replays with ``--replay FILE --targets T``. Nothing here is asserted and nothing
leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_NAMES = ("codec", "gossip", "frames", "manifest", "http")
_SUMMARY = "FUZZ-SUMMARY "
_MAX_SAVED_PER_SIGNATURE = 3


class Hang(BaseException):
    """One input ran past --timeout-s (a BaseException so no `except Exception` hides it)."""


class CrashLog:
    """Counts failures and saves the first few reproducers of each distinct signature."""

    def __init__(self, folder: Path, target: str) -> None:
        self.folder = folder
        self.target = target
        self.count = 0
        self.by_signature: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def record(self, data: bytes, kind: str, detail: str) -> None:
        self.count += 1
        # One line per failure: the parent counts these (atheris never returns to report).
        with (self.folder / f"{self.target}.log").open("a") as log:
            log.write(f"{kind}\n")
        last = detail.strip().splitlines()[-1] if detail.strip() else kind
        signature = re.sub(r"\d+", "N", f"{kind}: {last}")[:200]
        seen = self.by_signature.get(signature, 0)
        self.by_signature[signature] = seen + 1
        if seen >= _MAX_SAVED_PER_SIGNATURE:
            return
        digest = hashlib.sha1(data).hexdigest()[:16]
        stem = self.folder / f"{self.target}-{kind}-{digest}"
        stem.with_suffix(".bin").write_bytes(data)
        stem.with_suffix(".txt").write_text(f"{signature}\n\n{detail}\n")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- worker side


def _guarded_runner(target: Any, crashes: CrashLog) -> Callable[[bytes], None]:
    """Wrap ``target.run`` so every failure is recorded and the loop goes on."""
    from tests.fuzz.targets import OracleViolation

    def one(data: bytes) -> None:
        try:
            target.run(data)
        except OracleViolation:
            crashes.record(data, "violation", traceback.format_exc())
        except Hang:
            crashes.record(data, "hang", traceback.format_exc())
        except RecursionError:
            crashes.record(data, "recursion", traceback.format_exc())
        except MemoryError:
            crashes.record(data, "memory", traceback.format_exc())
        except Exception:
            crashes.record(data, "crash", traceback.format_exc())

    return one


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang


def run_mutate(name: str, count: int, seed: int, crashes: CrashLog, timeout_s: float) -> int:
    """Our own engine: mutants of the seeds, no coverage feedback. Returns inputs run."""
    from tests.fuzz.targets import TARGETS

    target = TARGETS[name]()
    seeds = target.seeds()
    one = _guarded_runner(target, crashes)
    rnd = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    # Mutants that did not fail are kept in a small rotating pool, so edits stack up over
    # generations (a poor man's corpus: no coverage signal, just depth).
    pool = list(seeds)
    done = 0
    while done < count:
        done += 1
        roll = rnd.random()
        if roll < 0.02:
            data = rnd.randbytes(rnd.randrange(1, 64))
        else:
            base = rnd.choice(seeds if roll < 0.6 else pool)
            data = target.mutate(base, rnd, seeds)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            one(data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if done % 10_000 == 0:
            print(f"{name}: {done:,} inputs, {crashes.count} crashes", file=sys.stderr, flush=True)
        if len(data) < 16_384 and rnd.random() < 0.05:
            if len(pool) < 512:
                pool.append(data)
            else:
                pool[rnd.randrange(len(pool))] = data
    return done


def run_atheris(
    name: str, count: int, seed: int, crashes: CrashLog, timeout_s: float, rss_limit_mb: int
) -> None:
    """libFuzzer through atheris; never returns (libFuzzer exits the process when done)."""
    # Optional (the `fuzz` extra); no type stubs exist for it.
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    with atheris.instrument_imports(include=["p2porch", "tests.fuzz", "yaml", "h11"]):
        from tests.fuzz.targets import TARGETS

        target = TARGETS[name]()
        seeds = target.seeds()
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-corpus-"))
    for data in seeds:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    one = _guarded_runner(target, crashes)
    max_len = max(4096, max(len(s) for s in seeds) * 2)
    args = [
        sys.argv[0],
        f"-runs={count}",
        f"-seed={seed}",
        f"-timeout={max(1, round(timeout_s))}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-max_len={max_len}",
        f"-artifact_prefix={crashes.folder}/{name}-libfuzzer-",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(args, one)
    atheris.Fuzz()


def worker(args: argparse.Namespace) -> None:
    name = args.worker
    crashes = CrashLog(Path(args.crashes), name)
    if args.engine == "atheris":
        run_atheris(name, args.count, args.seed, crashes, args.timeout_s, args.rss_limit_mb)
        return
    # No libFuzzer to watch memory here: cap the address space instead, so an input that
    # makes a decoder allocate without bound is a recorded MemoryError, not a dead machine.
    limit = (args.rss_limit_mb + 1024) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.perf_counter()
    done = run_mutate(name, args.count, args.seed, crashes, args.timeout_s)
    elapsed = time.perf_counter() - start
    summary = {
        "target": name,
        "engine": "mutate",
        "inputs": done,
        "seconds": round(elapsed, 1),
        "inputs_per_s": round(done / elapsed) if elapsed else 0,
        "crashes": crashes.count,
        "signatures": crashes.by_signature,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    print(_SUMMARY + json.dumps(summary), flush=True)


def replay(args: argparse.Namespace) -> None:
    """Run one saved input through one target and show what happens (exceptions propagate)."""
    from tests.fuzz.targets import TARGETS

    (name,) = args.targets.split(",")
    data = Path(args.replay).read_bytes()
    TARGETS[name]().run(data)
    print(f"{args.replay}: no failure")


# --------------------------------------------------------------------------- parent side


def _atheris_importable() -> bool:
    probe = [sys.executable, "-c", "import atheris"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


_LIBFUZZER_STAT = re.compile(r"^stat::(\w+):\s*(\d+)", re.MULTILINE)
_LIBFUZZER_DONE = re.compile(r"#(\d+)\s+DONE.*?exec/s: (\d+).*?rss: (\d+)Mb")


def run_target(name: str, args: argparse.Namespace, engine: str) -> dict[str, Any]:
    crashes = Path(args.crashes)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.glob(f"{name}-*"))
    log = crashes / f"{name}.log"
    logged_before = len(log.read_text().splitlines()) if log.exists() else 0
    command = [
        sys.executable,
        "-m",
        "benchmarks.fuzz_many",
        "--worker",
        name,
        "--engine",
        engine,
        "--count",
        str(args.count),
        "--seed",
        str(args.seed),
        "--crashes",
        str(crashes),
        "--timeout-s",
        str(args.timeout_s),
        "--rss-limit-mb",
        str(args.rss_limit_mb),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The child's stderr (libFuzzer's progress lines) goes to a file: `tail -f` it to watch.
    progress = crashes / f"{name}.stderr"
    start = time.perf_counter()
    with (
        progress.open("w") as err_file,
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True
        ) as child,
    ):
        out, _ = child.communicate()
    elapsed = time.perf_counter() - start
    err = progress.read_text(errors="replace")
    new_files = sorted(set(crashes.glob(f"{name}-*")) - before)
    result: dict[str, Any] = {"target": name, "engine": engine, "exit_code": child.returncode}
    for line in out.splitlines():
        if line.startswith(_SUMMARY):
            result.update(json.loads(line[len(_SUMMARY) :]))
    if engine == "atheris":
        stats = {k: int(v) for k, v in _LIBFUZZER_STAT.findall(err)}
        done = _LIBFUZZER_DONE.findall(err)
        inputs = stats.get("number_of_executed_units") or (int(done[-1][0]) if done else 0)
        result.update(
            inputs=inputs,
            seconds=round(elapsed, 1),
            inputs_per_s=round(inputs / elapsed) if elapsed else 0,
            peak_rss_mb=stats.get("peak_rss_mb") or (int(done[-1][2]) if done else None),
            crashes=(len(log.read_text().splitlines()) if log.exists() else 0)
            - logged_before
            + sum(1 for f in new_files if "-libfuzzer-" in f.name),
        )
        if child.returncode != 0:
            result["libfuzzer_tail"] = err.strip().splitlines()[-15:]
    elif child.returncode != 0 or "inputs" not in result:
        result["stderr_tail"] = err.strip().splitlines()[-15:]
    result["saved"] = [f.name for f in new_files if f.suffix != ".txt"][:10]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES))
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument(
        "--crashes",
        default=str(Path(tempfile.gettempdir()) / "p2porch-fuzz"),
        help="folder for reproducers and the children's stderr",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per input: a hang")
    parser.add_argument(
        "--rss-limit-mb", type=int, default=2048, help="atheris: RSS; mutate: address space + 1 GiB"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replay", help="run one saved input through --targets (one name)")
    args = parser.parse_args(argv)
    if args.replay:
        replay(args)
        return 0
    if args.worker:
        worker(args)
        return 0
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGET_NAMES))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TARGET_NAMES)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _atheris_importable() else "mutate"
    print(f"engine: {engine}; {args.count:,} inputs per target; reproducers -> {args.crashes}")
    failed = False
    for name in names:
        result = run_target(name, args, engine)
        failed |= bool(result.get("crashes")) or result.get("exit_code") not in (0, None)
        print(
            f"{name:9} {result.get('inputs', 0):>10,} inputs  "
            f"{result.get('seconds', 0):>8} s  {result.get('inputs_per_s', 0):>7,}/s  "
            f"crashes {result.get('crashes', '?'):>3}  peak RSS {result.get('peak_rss_mb')} MB",
            flush=True,
        )
        print("  " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
