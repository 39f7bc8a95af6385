"""Benchmarks of serve_journal against what users would pick instead.

``python -m benchmarks.run [--size quick|full]`` runs everything and writes docs/benchmarks.md.
Benchmarks report; they never fail on a slow machine. ``tests/test_benchmarks_smoke.py`` runs each
one at a tiny size only to keep the scripts from rotting.
"""
