"""`onnxpipe serve`: the exports behind an OpenAI-compatible HTTP API, on the same pipelines as the CLI.

- `openai`: request fields checked one by one, OpenAI's response objects and error bodies;
- `batching`: concurrent requests to an encoder export gathered into shared session runs;
- `generation`: chat and text completions on a decoder export (the one function to swap for
  continuous batching);
- `app`: the starlette application (routes, auth, limits, access log).

Only the serve command imports this package (starlette and uvicorn are the [serve] extra).
"""
