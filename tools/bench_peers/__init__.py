"""Benchmark peers: TRL's trainers on the set-up tools/bench_ppo.py saves, one process each."""
