"""Serve a reward model (any stage-2 output) over HTTP for PPO's `remote` reward source (docs/rewards.md).

python launch/serve_rm.py runs/x/rm --port 8000 [--host 127.0.0.1] [--batch-size 64] [--max-len N]
    [--max-body-mb 16] [--idle-timeout 30] [--request-timeout 600]

then  ... launch/stage3_ppo.py ... 'reward.sources.served={kind: remote, url: "http://127.0.0.1:8000/score"}'
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf.cli import setup_cpu_threads, setup_logging
from rlhf.registry import ModelLoadError
from rlhf.reward_server import BadAddress, Limits, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a stage-2 output directory (or a registry preset such as tiny-llama)")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port (printed on stdout)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows scored together, across requests")
    parser.add_argument(
        "--max-len", type=int, default=None, help="tokens kept of a row (default: the model's positions)"
    )
    parser.add_argument("--max-body-mb", type=float, default=16, help="largest request body, MiB (larger: HTTP 413)")
    parser.add_argument("--idle-timeout", type=float, default=30, help="s a connection may sit without a whole request")
    parser.add_argument("--request-timeout", type=float, default=600, help="s a request may wait (then 503)")
    args = parser.parse_args(argv)
    limits = Limits(
        max_body=int(args.max_body_mb * 2**20), idle_timeout=args.idle_timeout, request_timeout=args.request_timeout
    )
    setup_logging()
    setup_cpu_threads()
    try:
        serve(args.model, args.host, args.port, args.batch_size, args.max_len, limits)
    except (ModelLoadError, BadAddress) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
