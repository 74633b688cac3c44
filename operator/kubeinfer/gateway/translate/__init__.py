"""Responses API and Anthropic Messages API on top of a Chat Completions backend. Pure: dicts and bytes.

vLLM and llama-server serve `/v1/responses` and `/v1/messages` themselves, so the gateway passes those
through. A `remote` backend may only serve `/v1/chat/completions`; for it the gateway translates the
request here, sends it as a chat completion, and translates the answer (a JSON body, or an SSE stream
fed through `ChatToResponsesStream` / `ChatToMessagesStream`) back.

Only what maps faithfully is translated: text and image input, text output, sampling settings, stop
sequences, usage. Anything that needs a feature a chat backend lacks (stored responses, tools,
background runs, extended thinking...) raises `TranslationError`, which the gateway answers with a 400:
a clear refusal beats a silently different answer. Unknown fields are refused for the same reason.

Shapes follow the real captures in tests/fixtures (vLLM 0.32 and llama-server serve both APIs
natively), so a client sees the same events whether its model is local or remote.

Modules: `responses` (Responses <-> Chat Completions), `messages` (Anthropic Messages <-> Chat
Completions), and `common` (the error, request helpers and the chat-stream reader both build on).
"""
