"""The live KPI page of `inferos serve`: ``GET /dashboard`` (and ``GET /``, which redirects to it).

The page is one self-contained document built from ``data/dashboard.{html,css,js}``: the style and the script
are inlined (a browser sends the agent token only with the page's own ``fetch`` calls, never with a
``<script src>``), nothing is loaded from elsewhere (a Content-Security-Policy with the hashes of the two
inline blocks says so to the browser), and its script draws SVG charts itself. Every number on it comes from
the JSON routes every client uses (``/v1/metrics``, ``/v1/history``, ``/v1/policy``, ``/v1/health``,
``POST /v1/policy``, ``POST /v1/baseline``), so the page shows nothing a script could not read.

The policy form's choices are the policy schema's own ``Literal`` values, so the page offers what the server
accepts; a rejected value still comes back as the server's 422 message.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from importlib import resources
from typing import get_args

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

PATH = "/dashboard"


def _asset(name: str) -> str:
    return resources.files("inferos_cli").joinpath("data", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def choices() -> dict[str, list[str]]:
    """The values the policy schema accepts for the page's select fields."""
    from inferos_cli.settings import Device, KVMode, KVQuant, SchedulerMode

    return {"kv.mode": list(get_args(KVMode)), "kv.quant": list(get_args(KVQuant)),
            "scheduler.mode": list(get_args(SchedulerMode)), "scheduler.prefill_device": list(get_args(Device)),
            "scheduler.decode_device": list(get_args(Device))}


@functools.lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """The page (style, choices and script inlined) and its Content-Security-Policy."""
    style = _asset("dashboard.css")
    script = "const CHOICES = " + json.dumps(choices()) + ";\n" + _asset("dashboard.js")
    html = _asset("dashboard.html").replace("/*STYLE*/", style).replace("/*SCRIPT*/", script)
    csp = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
           "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
    return html, csp


def router() -> APIRouter:
    """``GET /dashboard`` (the page) and ``GET /`` (a redirect to it)."""
    api = APIRouter()

    @api.get(PATH, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        html, csp = page()
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-store",
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @api.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(PATH, status_code=307)

    return api
