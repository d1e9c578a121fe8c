"""The FastAPI app: routers, the API key dependency, the body limit, CORS, error handlers.

`create_app(state)` builds it around a started scheduler; `gptoss-mlx serve` (cli/serve.py) runs
it with uvicorn, and tests run it on a free local port.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from . import chat_completions, models, responses
from .errors import install_error_handlers
from .security import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from .state import ServerState


def create_app(
    state: ServerState,
    *,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app over `state` (see server/__init__.py for the modules).

    CORS is off unless `cors_origins` names the web origins allowed to call the server from a
    browser ("*" for any)."""
    app = FastAPI(
        title="gptoss-mlx",
        version=__version__,
        description="OpenAI-compatible Chat Completions and Responses for gpt-oss on MLX",
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    app.include_router(models.router)
    app.include_router(chat_completions.router)
    app.include_router(responses.router)
    install_error_handlers(app)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app
