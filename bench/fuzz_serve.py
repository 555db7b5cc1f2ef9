"""Fuzz the served endpoint (tiny model, loopback) and print one JSON line: cases tried, outcomes, refusals by
reason, crashes, restarts, RSS.

    python bench/fuzz_serve.py --cases 3000 --seconds 600               # the public front: crashes must be 0
    python bench/fuzz_serve.py --target triton --cases 400 --seconds 300  # bare tritonserver 2.51: what kills it

``--target triton`` sends the same cases to tritonserver's own loopback ports (no front) to show what the front is
for: each death is listed with the case (seed, index, mutation) that caused it; the supervisor restarts it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--target", choices=("front", "triton"), default="front")
    parser.add_argument("--start", type=int, default=0, help="first case index")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from serving.fuzz import fuzz_endpoint
    from serving.launch import TritonServer
    from serving.supervisor import Endpoint

    with tempfile.TemporaryDirectory(prefix="fuzz-serve-") as tmp:
        server = TritonServer("tiny", exit_timeout=3, parameters={"torch_threads": "1"},
                              env={"EASYANIMATE_MODEL_CACHE": str(Path(tmp) / "cache")},
                              log=str(Path(tmp) / "tritonserver.log"))
        with Endpoint(server, backoff=(0.5,), max_restarts=10_000 if args.target == "triton" else 5) as endpoint:
            result = fuzz_endpoint(endpoint, seed=args.seed, cases=args.cases, seconds=args.seconds,
                                   batch=args.batch, target=args.target, start=args.start)
            result["restart_causes"] = sorted({r["cause"] for r in endpoint.restarts})
    print(json.dumps({"bench": "fuzz_serve", **result}))


if __name__ == "__main__":
    main()
