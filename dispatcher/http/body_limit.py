"""The request size limit: an ASGI middleware that refuses bodies over the limit with
413 before anything parses them, whether the client declared the length or streams."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Room for the envelope (type, options) around a payload of the maximum size.
ENVELOPE_BYTES = 64 * 1024


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before parsing them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        seen = 0
        refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge as exc:
            if refused:
                await self._refuse(send, exc.size)

    async def _refuse(self, send: Send, size: int) -> None:
        detail = (
            f"request body of {size} bytes is over the limit of {self.limit}: the `payload` "
            f"field may be at most {self.limit - ENVELOPE_BYTES} bytes "
            "(DISPATCHER_MAX_PAYLOAD_BYTES)"
        )
        response = JSONResponse({"detail": detail}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
