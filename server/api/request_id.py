"""``X-Request-Id`` on every response, as vLLM's server sends it: the client's own id when its request
carried one, else the id the app gave the response (a generation's body ``id``), else a fresh one.
Pure ASGI and outermost, so errors answered by the guards and the error handlers carry it too."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"


class RequestIdHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k.lower() == HEADER), None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = next((v for k, v in headers if k.lower() == HEADER), None)
                request_id = incoming or own or uuid.uuid4().hex.encode()
                headers = [(k, v) for k, v in headers if k.lower() != HEADER] + [(HEADER, request_id)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
