"""Serve a reward model (any stage-2 output) over HTTP for PPO's `reward.remote` (docs/rewards.md).

python launch/serve_rm.py runs/x/rm --port 8000 [--host 127.0.0.1] [--batch-size 64]

then  ... launch/stage3_ppo.py ... reward.remote.url=http://127.0.0.1:8000/score
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import setup_cpu_threads, setup_logging
from rlhf.registry import ModelLoadError
from rlhf.reward_server import BadAddress, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a stage-2 output directory (or a registry preset such as tiny-llama)")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port (printed on stdout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows scored together, across requests")
    args = parser.parse_args(argv)
    setup_logging()
    setup_cpu_threads()
    try:
        serve(args.model, args.host, args.port, args.batch_size)
    except (ModelLoadError, BadAddress) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
