"""A stand-in serving process that dies (SIGKILL, by its own hand) at an exact point of a request.

`python dying_deployment.py PORT` serves `/healthz` and `/status` like a deployment; then
`POST /hot_load` dies mid-hot-load, `POST /v1/completions` dies mid-request, and a streamed
completion sends one chunk and dies mid-stream. Used only to put a crash at a deterministic point
(the real process's crash recovery is tested with `python -m tether.deployment`).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
STATUS = {
    "current": {"identity": "base-model"},
    "replicas": [
        {"current_snapshot_identity": "base-model", "readiness": True, "loading_state": {"stage": "idle"}}
    ],
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}


@app.get("/status")
async def status() -> dict:
    return STATUS


@app.post("/hot_load")
async def hot_load() -> dict:
    die()
    return {}


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    if not body.get("stream"):
        die()

    async def events():
        chunk = {"choices": [{"index": 0, "text": "first", "finish_reason": None, "logprobs": None}]}
        yield f"data: {json.dumps({'id': 'c', 'object': 'text_completion', 'created': 0, 'model': 'm', **chunk})}\n\n"
        die()  # resumed only once the first chunk went out
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
