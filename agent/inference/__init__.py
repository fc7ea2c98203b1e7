"""Local inference: worker subprocesses per model, their supervision, the local API.

Agent side: :mod:`.runtime` (which worker serves, warm swaps, restarts),
:mod:`.supervisor` (one worker process), :mod:`.api` (HTTP),
:mod:`.schemas` (request checks, response shapes), :mod:`.stats` and
:mod:`.metrics` (telemetry, Prometheus), :mod:`.checker` (the update
pipeline's health check), :mod:`.spec` (what a worker loads).

Worker side, never imported by the agent process: :mod:`.worker`,
:mod:`.backend`, :mod:`.llama_backend`, :mod:`.onnx_backend`, :mod:`.golden`.
Nothing is re-exported here, so importing one agent-side module does not
drag in the rest.
"""
