"""`gptoss-mlx serve`: an OpenAI-compatible HTTP server (Chat Completions and Responses).

app.py               create_app(): the FastAPI app, its routers, middleware and error handlers
state.py             ServerState: what the routes share (scheduler, tokenizer, ids, store, limits)
errors.py            OpenAI's error envelope; our errors mapped onto HTTP statuses
security.py          the API key dependency (constant-time compare), the body size limit
chat_types.py        Chat Completions bodies, as pydantic models named after OpenAI's types
responses_types.py   Responses API bodies and stream events, likewise
chat_request.py      a Chat Completions request -> harmony ChatRequest + generation settings
responses_request.py a Responses request (input items, instructions, tools) -> the same
settings.py          what both share: sampling, structured outputs (grammars), the rendered prompt
reasoning_blob.py    `reasoning.encrypted_content`: the chain of thought for stateless clients
turn.py              one generation: submit to the engine, harmony-parse its tokens into deltas
stop_strings.py      `stop` sequences matched on the visible text as it streams
chat_completions.py  the router of POST /v1/chat/completions (streamed and not)
responses.py         the router of /v1/responses (POST, GET, DELETE; streamed and not)
response_store.py    the LRU of stored responses behind `store` / `previous_response_id`
models.py            the router of GET /v1/models and GET /health
sse.py               server-sent events framing

The server never touches MLX: it renders prompts (harmony), submits them to the engine's
scheduler thread (engine/scheduler.py) and reads token events back on the event loop.
May import anything below it (engine, harmony, weights, model). Never the CLI.
"""
