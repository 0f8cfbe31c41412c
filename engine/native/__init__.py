"""Levante's own engine: paged attention over a torch model, stepped in this process.

``engine_core.EngineCore`` schedules, runs and samples one step at a time;
``builder`` loads a model into one; ``async_engine.AsyncEngine`` drives it
behind ``EngineClient`` from its own thread. ``models`` holds the torch model
code, ``parallel`` expert parallelism across processes. What the vLLM backend
shares with it (admission, outputs, reasoning, tokenizers, checkpoints) lives
one level up.
"""
