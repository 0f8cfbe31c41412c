"""What vulture cannot see used: names that frameworks call or read by name, not our code.

Read by vulture only (pyproject.toml [tool.vulture]), never imported. A name here counts as used
wherever it is defined, so keep entries to framework hooks, fields read by name and the one state
tests wait on; a function only tests call is dead, not allowlisted.
"""

# gRPC servicer methods, called by grpc by the RPC's name
_.Export  # cluster/ops/bench/otlp_sink.py: the OTLP TraceService

# Ray Serve: the application builder named in serveConfigV2 (the Helm chart's import_path)
app_builder  # cluster/serve/app.py
# Ray Serve deployment and request-router hooks
_.check_health  # cluster/serve/replica.py
_.initialize_state  # cluster/serve/request_router.py
_.choose_replicas
_.on_request_routed
_.should_backoff  # set on Serve's routing context, read by Serve

# uvicorn's Server: it calls capture_signals() around serving, and reads should_exit each tick
_.capture_signals  # cluster/frontdoor/http/server.py
_.should_exit
# llguidance's TokenizerWrapper reads the vocabulary object's fields by name
_.special_token_ids  # engine/structured/guidance.py

# prometheus_client calls a registered Collector's collect() at scrape time
_.collect  # cluster/telemetry/collectors.py

# torch.nn.Module adds extra_repr() to print(module)
_.extra_repr  # engine/native/models/layers.py

# vLLM plugins: the logits processor is loaded by its import path (engine/vllm/args.py PROCESSOR),
# then called through vLLM's LogitsProcessor and StatLoggerBase interfaces
ReasoningLogitsProcessor  # engine/vllm/processor.py
_.is_argmax_invariant
_.update_state
_.log_engine_initialized  # engine/vllm/stats.py
mm_cache_stats  # StatLoggerBase.record's parameters, passed by keyword
engine_idx

# dataclass fields read by name: asdict() into JSON reports, fields()/getattr, YAML keys
_.ttft_p50_ms  # cluster/ops/bench/timing.py PathStats, the bench-serving report's columns
_.ttft_p99_ms
_.itl_p50_ms
_.itl_p99_ms
_.chunk_gap_p50_ms
_.chunk_gap_p99_ms
_.tokens_per_chunk
_.max_failed  # cluster/ops/drill/records.py SLO: set in scenario files, checked field by field
_.max_duplicated_tokens
_.max_lost_tokens
_.max_detect_s
_.max_failover_s
_.max_p99_latency_s
_.min_requests
_.to_region  # cluster/ops/drill/records.py Failover, saved with the drill's records
_.quantization  # engine/config.py VllmConfig, passed to vLLM by name (engine/vllm/args.py)

# a counter the telemetry tests wait on for a fresh poll of the engines
_.polls  # cluster/telemetry/poller.py

# EngineStats is the engine's public boundary: LLM.stats() and EngineClient.stats() hand these to users
_.kv_cache_bytes  # engine/types.py
_.kv_used_bytes
_.num_generated_tokens

# What a scheduler step did and the pool's free list, in exact ids: the torch-free core's unit tests
# check the one scheduling rule through them (tests/engine/core)
_.num_batched_tokens  # engine/core/scheduler.py SchedulerOutput
_.preempted_ids
_.null_block  # engine/core/block_pool.py BlockPool
_.free_block_ids
