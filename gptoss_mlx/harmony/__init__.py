"""The harmony chat format gpt-oss was trained on: requests in, token ids out, and back.

tokenizer.py    o200k_harmony through tiktoken, from local files; streaming detokenizer
request.py      an OpenAI-shaped chat request parsed into plain dataclasses
response_format.py  response_format / tool_choice parsed; the `# Response Formats` section
tool_schema.py  function tools rendered as harmony's TypeScript-like namespace
render.py       a request as a harmony prompt, token for token as openai-harmony renders it
                (old reasoning dropped after a final answer, kept while a tool loop is open)
parser.py       what the model writes, parsed one token at a time into channels and tool calls
calls.py        which addressed messages are function calls; "not available" for the others
turn.py         an assistant turn across segments (a refused call answered, the model goes on)

May import: gptoss_mlx.errors, gptoss_mlx.model, gptoss_mlx.weights (none of it needs MLX).
"""
