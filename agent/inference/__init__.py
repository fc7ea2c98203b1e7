"""Local inference: worker subprocesses per model, their supervision, the local API.

Agent side: :mod:`.runtime` (which workers serve which models, warm swaps,
restarts) with :mod:`.model_host` (one assigned model name), :mod:`.slot`
(one version and its worker), :mod:`.room` and :mod:`.memory` (the
loaded-model cap, free RAM, least recently used unloading),
:mod:`.gate` (how many requests a worker runs at once, in arrival order),
:mod:`.candidate_freeze` (a warm candidate runs only while the serving
worker is idle), :mod:`.supervisor` (one worker process), :mod:`.api`
(HTTP, the OpenAI routes) and :mod:`.ollama_api` (Ollama's routes), both
running text through :mod:`.generation`, :mod:`.schemas` and
:mod:`.ollama_shapes` (request checks, response shapes), :mod:`.tool_calls`
(tools in, calls out; pure), :mod:`.stats` and
:mod:`.metrics` (telemetry, Prometheus), :mod:`.spec` (what a worker loads).
The health check a model passes before it takes traffic lives in
:mod:`agent.healthcheck`.

Worker side, never imported by the agent process: :mod:`.worker`,
:mod:`.backend`, :mod:`.prompting` (template, grammar), :mod:`.llama_backend`
with :mod:`.batch_decoder` (several
generations in one llama.cpp context), :mod:`.sampling` and
:mod:`.text_stream`, and :mod:`.onnx_backend`.
Nothing is re-exported here, so importing one agent-side module does not
drag in the rest.
"""
