"""An OpenAI-compatible HTTP server for the engine (FastAPI + uvicorn; `pip install 'qwen2vl_fast[serve]'`).

    qwen2vl-fast serve --model DIR [--port 8000] [--api-key KEY] [--allowed-local-media-path DIR]

    from qwen2vl_fast.server import create_app      # the app without uvicorn, e.g. for tests
    app = create_app(engine, served_model_name="qwen2-vl")

Routes: POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health, GET /metrics (Prometheus).
"""


def create_app(engine, **kwargs):
    from .app import create_app as _create_app  # FastAPI is imported only when a server is built

    return _create_app(engine, **kwargs)


__all__ = ["create_app"]
