"""The front door's OpenAI-compatible HTTP API: routes (app), request and response mapping, and the
uvicorn server that runs on the front door's event loop beside grpc.aio."""
