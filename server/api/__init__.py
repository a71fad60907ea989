"""HTTP only: OpenAI-compatible routes, schemas, errors, SSE framing and the operations routes."""
