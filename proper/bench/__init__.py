"""Benchmarks, packaged so that ``proper bench`` works from any install: timing (interleaved rounds, peak memory),
serving set-ups (proper vs peft on SmolLM2), the op check of the demo, layer-level cases and providers, the suite
runner, and the model-level generate / training-step benchmarks. The library never imports this package."""
