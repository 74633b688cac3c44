"""The gateway: one OpenAI-compatible API over every ready replica of every model."""
