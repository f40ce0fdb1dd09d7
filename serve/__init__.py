"""sdrt.serve: the runtime as an HTTP service (``sdrt serve``; FastAPI, uvicorn, Prometheus metrics), batching
requests through ``Pipeline.run_batch``; and a Ray Serve deployment of it for many replicas
(``sdrt.serve.ray_app``). Needs the ``[serve]`` extra (``[ray]`` for Ray)."""
