"""``rwkvkit serve``: an OpenAI-compatible HTTP server on the batching engine (FastAPI + uvicorn,
SSE streaming, Prometheus metrics). Importing this package needs none of the ``serve`` extra:
the web parts are imported by :mod:`rwkvkit.server.main` when the server starts."""
