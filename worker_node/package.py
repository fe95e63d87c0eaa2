"""Load a model package on a node (or in the push check's child process) and check it.

    python -m worker_node.package check DIR     one JSON line: {"ok": true, ...} or the error

A package's code runs only here; the control plane never imports it. `make`, its processors
and the optional batch step (one frame of each of several streams in one call, what a GPU
model wants) are docs/models.md's; without a batch step the node calls each processor.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import PackageError
from common.package import Manifest, load_manifest

CHECK_RATE = 48000
CHECK_CHUNK_S = 0.02


class Processor(Protocol):
    latency_samples: int

    def process(self, frames: np.ndarray) -> np.ndarray: ...   # int16 in, as many int16 out


BatchStep = Callable[[Sequence[Any], Sequence[np.ndarray]], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Loaded:
    """A package ready to serve: its manifest, where it is, and its code's entry points."""

    manifest: Manifest
    files: Path
    factory: Callable[[int, dict[str, Any], Path], Any]
    batch: BatchStep | None

    def make(self, sample_rate: int) -> Processor:
        proc = self.factory(sample_rate, dict(self.manifest.params), self.files)
        latency = getattr(proc, "latency_samples", None)
        if not isinstance(latency, int) or latency < 0 or not callable(
                getattr(proc, "process", None)):
            raise PackageError(f"{self.manifest.entry} returned {type(proc).__name__}, which "
                               "is not a processor: it needs `latency_samples` (an int >= 0) "
                               "and `process(frames) -> frames`")
        return proc  # type: ignore[no-any-return]


def _function(directory: Path, spec: str, tag: str) -> Callable[..., Any]:
    """`module:function` from the package's own directory, under a name of its own (two
    versions of one model load side by side without sharing modules)."""
    module_name, func = spec.split(":")
    path = directory / f"{module_name}.py"
    if not path.is_file():
        raise PackageError(f"{spec}: the package has no {module_name}.py")
    unique = f"voicemodel_{tag}_{module_name}"
    if unique in sys.modules:
        module = sys.modules[unique]
    else:
        loader_spec = importlib.util.spec_from_file_location(unique, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(directory))   # its own helper modules import as usual
        try:
            sys.modules[unique] = module
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[unique]
            raise PackageError(f"{path.name} failed to import: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(directory))
    found = getattr(module, func, None)
    if not callable(found):
        raise PackageError(f"{spec}: {module_name}.py has no function {func!r}")
    return found  # type: ignore[no-any-return]


def load(directory: Path, tag: str = "") -> Loaded:
    """Import a package's entry (and batch step) from its unpacked directory."""
    directory = Path(directory).resolve()
    manifest = load_manifest(directory)
    tag = tag or f"{manifest.name}_{abs(hash(str(directory))):x}".replace("-", "_").replace(
        ".", "_")
    factory = _function(directory, manifest.entry, tag)
    batch = _function(directory, manifest.batch, tag) if manifest.batch else None
    return Loaded(manifest, directory, factory, batch)


def test_audio(rate: int, seconds: float = 1.0) -> np.ndarray:
    """A voiced-like test signal: a 150 Hz tone with harmonics and a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    x: np.ndarray = np.sum([np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)], axis=0)
    x = 0.25 * x / np.max(np.abs(x)) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return np.asarray(x * 32767, dtype=np.int16)


def run_check(directory: Path) -> dict[str, Any]:
    """Load the package and stream a second of test audio through it, per stream and
    through its batch step: an exception, a wrong length, non-finite output or slower than
    real time refuses it (PackageError, with the package's own error). Returns what was
    measured."""
    try:
        loaded = load(directory)
        audio = test_audio(CHECK_RATE)
        chunk = int(CHECK_RATE * CHECK_CHUNK_S)
        procs = [loaded.make(CHECK_RATE) for _ in range(2 if loaded.batch else 1)]
        started = time.perf_counter()
        for i in range(0, len(audio), chunk):
            frames = audio[i:i + chunk]
            if loaded.batch is not None:
                outs = list(loaded.batch(procs, [frames] * len(procs)))
                if len(outs) != len(procs):
                    raise PackageError(f"batch step {loaded.manifest.batch} returned "
                                       f"{len(outs)} outputs for {len(procs)} streams")
            else:
                outs = [procs[0].process(frames)]
            for out in outs:
                _check_output(loaded.manifest, frames, out)
        took = time.perf_counter() - started
    except PackageError:
        raise
    except Exception as e:  # the package's own failure, said as it is
        raise PackageError(f"{type(e).__name__}: {e}") from e
    if took > len(audio) / CHECK_RATE:
        raise PackageError(f"{loaded.manifest.name} is slower than real time: one second of "
                           f"audio took {took:.2f} s on this machine")
    return {"name": loaded.manifest.name, "latency_ms": round(
        1000 * procs[0].latency_samples / CHECK_RATE, 3), "realtime_factor": round(took, 4),
        "batch": bool(loaded.batch), "streams_per_gpu": loaded.manifest.streams_per_gpu}


def _check_output(manifest: Manifest, frames: np.ndarray, out: Any) -> None:
    arr = np.asarray(out)
    if arr.shape != frames.shape:
        got = arr.shape[0] if arr.ndim else 0
        raise PackageError(f"{manifest.entry}: process() returned {got} samples for "
                           f"{len(frames)}; it must return exactly as many "
                           "(the input delayed by latency_samples)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise PackageError(f"{manifest.entry}: process() returned NaN or infinite samples")
    if arr.dtype != np.int16:
        raise PackageError(f"{manifest.entry}: process() returned {arr.dtype} samples; "
                           "return int16 (np.clip(x, -32768, 32767).astype(np.int16))")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "check":
        print("usage: python -m worker_node.package check DIR", file=sys.stderr)
        return 2
    try:
        print(json.dumps({"ok": True, **run_check(Path(args[1]))}))
        return 0
    except PackageError as e:
        print(json.dumps({"ok": False, "error": str(e)}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
