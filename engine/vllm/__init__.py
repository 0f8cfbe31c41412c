"""The vLLM backend: ``EngineClient`` over vLLM's v1 ``AsyncLLM``.

The only place in Levante that imports vllm. Requests are admitted, split
into reasoning and answer text, detokenized and cut at stop strings by the
same code as the native engine's (``engine.admission``, ``engine.output``);
vLLM gets token ids and runs the model, its thinking budget enforced inside
vLLM's sampler by ``ReasoningLogitsProcessor``.
"""
