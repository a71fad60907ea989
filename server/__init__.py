"""The service: request handling, scheduling, the engine thread and the HTTP API. Never imports torch."""
