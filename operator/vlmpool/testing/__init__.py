"""Helpers that make real test material (tiny models and PEFT adapters) for the tests, the
benchmarks and `vlmpool dev`'s quickstart. Needs the `test` extra (torch, transformers, peft)."""
