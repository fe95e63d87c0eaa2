"""CPU per stream per chunk of a model package: per-stream `process` calls vs its batch step.

    python bench/batch_cpu.py          # a table, one row per package under models/
    python bench/batch_cpu.py --json   # the table, then one JSON object (keyed by name) last

Two sets of processors stream the same test audio (each stream from its own offset): one
set through `proc.process(frame)` per stream per tick, the other through one batch call
per tick. The ticks are cut into rounds that alternate between the two, the order flipping
each round, so a noisy neighbour or a frequency step hits both alike; each figure is the
median over rounds of process CPU time (time.process_time) per chunk per stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from worker_node.package import Loaded, load, test_audio

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ROUNDS = 9                               # odd: the median is one measured round


def measure(package_dir: Path, streams: int = 4, seconds: float = 5.0, rate: int = 48000,
            chunk_ms: float = 20.0, rounds: int = ROUNDS) -> dict[str, Any]:
    """CPU ms per chunk per stream, per-stream calls vs batch (None without a batch step)."""
    loaded = load(package_dir)
    chunk = int(rate * chunk_ms / 1000)
    ticks = max(rounds, int(seconds * rate) // chunk)
    audio = test_audio(rate, ticks * chunk / rate)
    # each stream its own offset into the audio, so no two streams see the same frames
    feeds = [np.roll(audio, i * len(audio) // streams + 7 * i) for i in range(streams)]
    _warm_up(loaded, rate, chunk, streams)
    single, batch = [loaded.make(rate) for _ in range(streams)], [
        loaded.make(rate) for _ in range(streams)]

    def per_stream(frames: list[np.ndarray]) -> None:
        for proc, frame in zip(single, frames, strict=True):
            proc.process(frame)

    def batched(frames: list[np.ndarray]) -> None:
        assert loaded.batch is not None
        loaded.batch(batch, frames)

    runs: dict[str, tuple[Callable[[list[np.ndarray]], None], list[float]]] = {
        "single": (per_stream, []), "batch": (batched, [])}
    if loaded.batch is None:
        del runs["batch"]
    bounds = np.linspace(0, ticks, rounds + 1).astype(int).tolist()
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            step, cpu_ms = runs[name]
            started = time.process_time()
            for t in range(bounds[r], bounds[r + 1]):
                step([feed[t * chunk:(t + 1) * chunk] for feed in feeds])
            took = time.process_time() - started
            cpu_ms.append(1000 * took / ((bounds[r + 1] - bounds[r]) * streams))
    single_ms = statistics.median(runs["single"][1])
    batch_ms = statistics.median(runs["batch"][1]) if "batch" in runs else None
    return {"single_cpu_ms_per_stream": round(single_ms, 4),
            "batch_cpu_ms_per_stream": None if batch_ms is None else round(batch_ms, 4),
            "ratio": None if batch_ms is None else round(batch_ms / single_ms, 3),
            "streams": streams, "package": loaded.manifest.name}


def _warm_up(loaded: Loaded, rate: int, chunk: int, streams: int) -> None:
    """First calls pay for imports, caches and allocations; throwaway processors take them."""
    procs = [loaded.make(rate) for _ in range(streams)]
    frames = [test_audio(rate, 3 * chunk / rate)[:chunk]] * streams
    for _ in range(3):
        for proc, frame in zip(procs, frames, strict=True):
            proc.process(frame)
        if loaded.batch is not None:
            loaded.batch(procs, frames)


def packages(models_dir: Path = MODELS_DIR) -> list[Path]:
    return sorted(p for p in models_dir.iterdir() if (p / "model.toml").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line last")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    results = {r["package"]: r for r in (
        measure(p, args.streams, args.seconds) for p in packages())}
    print(f"{args.streams} streams, 48000 Hz, 20 ms chunks, process CPU ms per chunk per "
          f"stream (median of {ROUNDS} interleaved rounds)")
    print(f"{'package':<12} {'single':>8} {'batch':>8} {'batch/single':>12}")
    for name, r in results.items():
        b, ratio = r["batch_cpu_ms_per_stream"], r["ratio"]
        print(f"{name:<12} {r['single_cpu_ms_per_stream']:>8.4f} "
              f"{'-' if b is None else f'{b:.4f}':>8} {'-' if ratio is None else ratio:>12}")
    if args.json:
        print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
