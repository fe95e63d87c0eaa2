"""Cloud benchmark: cold connect through EC2 (a local moto server; its instances boot from
their user-data as local processes) beside the same through the local driver, in one run.

    python bench/clouds.py [--load-s 10] [--rounds 2] [--json]

The real stack (`voicectl run` with common/multicloud.toml, its ec2 provider pointed at our
moto) boots a node for a user who finds none: through EC2 for a user at us-west (the spot
price there is the cheapest within reach), through the local driver for one at eu-west
(no EC2 within reach). Both providers stand for a 1 s VM boot. The figure that compares
them is the overhead above boot + model load: what our path from RunInstances (or the local
driver's create) to a streaming node costs, the cloud's own boot time aside. The ratio
`ec2_over_local_overhead` has the target <= 1.5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import lobby, log  # noqa: E402
from report import report  # noqa: E402

from common.config import load_config  # noqa: E402
from provisioner.clouds import ec2  # noqa: E402
from voicectl import devcloud, procs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (model, where the user is) per round: each round a pool nobody used yet, so it is cold.
ROUNDS = [("kaito", "eu-west", "teto", "us-west"), ("miku", "eu-west", "kaito", "us-west"),
          ("teto", "eu-west", "miku", "us-west")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-s", type=float, default=10.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--rounds", type=int, default=2, choices=range(1, len(ROUNDS) + 1))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logs = ROOT / "var" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log("starting a local EC2 API (moto) and Redis ...")
    endpoint, moto = devcloud.start_moto()
    url, redis_proc = procs.start_redis()
    port, flower = procs.free_port(), procs.free_port()
    env = {**os.environ, "REDIS_URL": url, "MODEL_LOAD_SECONDS": str(args.load_s),
           "VOICE_DEV_USERS": "1",   # users named with ?user=
           "VOICE_CONFIG": str(ROOT / "common" / "multicloud.toml"),
           "VOICE_EC2_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing",
           "DATABASE_URL": "sqlite:///" + str(ROOT / "var" / "bench-clouds.sqlite")}
    cfg = load_config(env)
    aws = cfg.provider("aws")
    driver = ec2.ec2_driver("us-west-2", access_key="testing", secret_key="testing",
                            endpoint=endpoint)
    ec2.list_ours(driver, cfg.cluster)   # moto builds a region on its first call: not ours
    init = devcloud.CloudInit(endpoint, "us-west-2", log_dir=logs / "bench-vms",
                              cluster=cfg.cluster).start()
    log(f"starting the real stack: voicectl run on port {port} ...")
    stack = procs.spawn([sys.executable, "-m", "voicectl", "run", "--port", str(port),
                         "--flower-port", str(flower)], env=env,
                        log=logs / "bench-clouds.log")
    local_over, ec2_over = [], []
    figures: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while procs.port_free("127.0.0.1", port):
            if time.monotonic() > deadline or stack.poll() is not None:
                raise RuntimeError(f"voicectl run did not start; see {logs}/bench-clouds.log")
            time.sleep(0.1)
        time.sleep(2.0)   # the Celery worker connects
        ws_url = f"ws://127.0.0.1:{port}"
        boot = {"local": cfg.provider("local").boot_s, "aws": aws.boot_s}
        for r, (m_local, at_local, m_ec2, at_ec2) in enumerate(ROUNDS[:args.rounds]):
            for kind, model, where, out in (("local", m_local, at_local, local_over),
                                            ("ec2", m_ec2, at_ec2, ec2_over)):
                log(f"round {r + 1}: cold connect through {kind} ({model} at {where}) ...")
                elapsed, msgs = lobby(ws_url, f"user=cold-{kind}-{r}&model={model}"
                                              f"&region={where}")
                assert msgs[-1]["type"] == "ready", msgs
                provider = "local" if kind == "local" else "aws"
                out.append(elapsed - args.load_s - boot[provider])
                figures[f"cold_connect_s_{kind}_{r + 1}"] = round(elapsed, 3)
    finally:
        procs.stop([stack], timeout_s=30)
        init.stop()
        procs.stop([redis_proc, moto])
    lo, hi = float(np.median(local_over)), float(np.median(ec2_over))
    figures.update(local_overhead_above_boot_and_load_s=round(lo, 3),
                   ec2_overhead_above_boot_and_load_s=round(hi, 3),
                   ec2_over_local_overhead=round(hi / lo, 2) if lo > 0 else None,
                   model_load_s=args.load_s, vm_boot_s=boot["aws"], rounds=args.rounds)
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
