"""The server a user would write by hand, as ``bench.door``'s yardstick:
FastAPI under uvicorn, the built-in embed model loaded in this process, each
``POST /v1/embeddings`` encoded on its own, on the event loop, as it comes.
No queue, no batching, no worker process: what gpuvisor's door is measured
against. ``python -m bench.naive_server PORT`` serves on 127.0.0.1:PORT.

It answers OpenAI's shape, vectors as JSON lists, as the door does; it checks
nothing and bounds nothing, so it is for the bench only."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request

from worker.modes.embed import load


def create_app() -> FastAPI:
    embed = load(device="cpu")["embed"]  # @batched: a list of payloads in, a list of results out
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body = await request.json()
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        array = embed([{"texts": texts}])[0]
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(array)]
        return {"object": "list", "data": data, "model": body["model"]}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
