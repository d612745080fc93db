"""The node's HTTP layer: OpenAI-compatible routes, attestation, receipts, metrics (FastAPI on uvicorn)."""
