"""Benchmarks and smoke runs: tooling that measures the pipeline, apart from the stage entry points
in launch/. Run from a checkout's root as modules, e.g. `python -m tools.bench_ppo`, so `rlhf`,
`stages` and `tools` import without a path insert; the tests import them as `from tools import …`.
Not shipped in the wheel (pyproject's package discovery includes rlhf and stages only).

  bench_ppo.py          PPO throughput and memory, ours against TRL's (docs/benchmarks.md)
  bench_peers/          TRL's trainers on bench_ppo's set-up, run by it in their own processes
  bench_rollout.py      rollout speed of the hf and vllm engines, and one PPO step's split
  smoke_real_shape.py   the Qwen2.5-0.5B pipeline at its real shape with random weights (sizing)
  zero3_loop.py         a stage under two-process ZeRO-3, N times: does it end cleanly every time
"""
