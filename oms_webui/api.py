"""How the WebUI's API answers for One More Step: a refused request is HTTP 422 with the message, and a txt2img or
img2img request whose One More Step "args" is not a list is answered before the WebUI reads it (its API would answer
``KeyError: 0``). Needs fastapi and Starlette, which every WebUI of the family serves its API with."""

from __future__ import annotations

import json

from fastapi.exceptions import HTTPException

from lib_oms.errors import OMSError
from oms_webui.args import TITLE, alwayson_args_problem


class RequestRefused(HTTPException):
    """An OMS error in what was asked for (an argument, a missing or unfit file). The WebUI's API answers with an
    exception's ``status_code`` attribute and prints no traceback for an HTTPException: this is HTTP 422 with the
    message, like the API's own checks of a request. Other errors (bugs, out of memory) stay 500 with a traceback."""

    def __init__(self, error: OMSError):
        super().__init__(status_code=422, detail=str(error))
        self.error = error

    def __str__(self):
        return self.detail


def refusal(error: Exception) -> Exception:
    return RequestRefused(error) if isinstance(error, OMSError) else error


class AlwaysonArgsCheck:
    """ASGI middleware answering HTTP 422 with a message for a txt2img/img2img request whose One More Step "args"
    is not a list. Other requests pass untouched: the body read here is handed on as it came."""

    PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message.get("type") != "http.request" or not message.get("more_body", False):
                break
        problem = alwayson_args_problem(body, TITLE)
        if problem is not None:
            content = json.dumps({"error": "HTTPException", "detail": problem, "body": "", "errors": problem})
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": content.encode()})

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def add_middleware(app, middleware) -> None:
    """``app.add_middleware`` once the app serves requests, on every Starlette the WebUIs ship. Starlette ≤ 0.2x
    (A1111: 0.26) rebuilds its middleware stack there; later ones (Forge Neo: 0.50) refuse ("Cannot add middleware
    after an application has started") and build the stack from ``user_middleware`` when it is None, which the next
    request then does with this one in it."""
    try:
        app.add_middleware(middleware)
    except RuntimeError:
        from starlette.middleware import Middleware

        app.user_middleware.insert(0, Middleware(middleware))
        app.middleware_stack = None


def on_app_started(_demo, app) -> None:
    add_middleware(app, AlwaysonArgsCheck)
