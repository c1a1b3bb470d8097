"""Benchmarks for the forgetting harness: file formats, prompts and scoring (lm-evaluation-harness rules), and the engine that runs them on our model."""
