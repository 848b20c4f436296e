"""How the WebUI's API answers for One More Step: a refused request is HTTP 422 with the message. A txt2img or
img2img request that asks for One More Step is checked before the WebUI reads it: its "args" (a list; an object there
would answer ``KeyError: 0``), every argument, the module named, and whether One More Step can run in this WebUI as it
runs now; what would be refused is answered at once, as a host that shows script errors without stopping (SD.Next)
would otherwise answer 200. Needs fastapi and Starlette, which every WebUI serves its API with."""

from __future__ import annotations

import json

from fastapi.exceptions import HTTPException

from lib_oms.errors import ModuleFileError, OMSError
from lib_oms.options import AUTOMATIC
from lib_oms.sources import named_module
from oms_webui.args import TITLE, ArgumentError, OMSArgs, alwayson_request, module_name
from oms_webui.environment import WORDS, module_dirs, module_entries


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


def module_problem(args: OMSArgs) -> str | None:
    """Why the module named in ``args`` cannot be used, or None (Automatic, or a module found)."""
    if args.module == AUTOMATIC:
        return None
    try:
        named_module(module_name(args.module), module_entries(), module_dirs(), WORDS)
    except ModuleFileError as missing:
        return str(ArgumentError(f"One More Step: argument 'module' (OMS module): {missing}"))
    return None


def request_problem(body: bytes, cannot_run) -> str | None:
    """What a txt2img/img2img request asking for One More Step would be refused for, or None."""
    args = alwayson_request(body, TITLE)
    if args is None or isinstance(args, str):
        return args
    return module_problem(args) or cannot_run()


class AlwaysonArgsCheck:
    """ASGI middleware answering HTTP 422 with a message for a txt2img/img2img request whose One More Step part
    would be refused (``request_problem``; ``cannot_run()`` says why the WebUI cannot run it now, or None). Other
    requests pass untouched: the body read here is handed on as it came."""

    PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

    def __init__(self, app, cannot_run=lambda: None):
        self.app, self.cannot_run = app, cannot_run

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
        problem = request_problem(body, self.cannot_run)
        if problem is not None:
            content = json.dumps({"error": "HTTPException", "detail": problem, "body": "", "errors": problem})
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": content.encode()})

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def add_middleware(app, middleware, **options) -> None:
    """``app.add_middleware`` once the app serves requests, on every Starlette the WebUIs ship. Starlette ≤ 0.2x
    (A1111: 0.26) rebuilds its middleware stack there; later ones (Forge Neo: 0.50) refuse ("Cannot add middleware
    after an application has started") and build the stack from ``user_middleware`` when it is None, which the next
    request then does with this one in it."""
    try:
        app.add_middleware(middleware, **options)
    except RuntimeError:
        from starlette.middleware import Middleware

        app.user_middleware.insert(0, Middleware(middleware, **options))
        app.middleware_stack = None


def app_started(cannot_run):
    """The on_app_started callback that puts the request check in front of the API."""
    def on_app_started(_demo, app) -> None:
        add_middleware(app, AlwaysonArgsCheck, cannot_run=cannot_run)
    return on_app_started
