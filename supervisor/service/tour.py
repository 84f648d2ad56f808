"""The five-minute tour behind ``make demo``: every step of the README's
example, with the worker's pid and the time each step took, so a newcomer
sees the process boundary at work."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from supervisor.api import Supervisor


def _step(title: str, fn, show=lambda r: r) -> Any:
    started = time.perf_counter()
    result = fn()
    print(f"  {time.perf_counter() - started:7.3f}s  {title:<44} -> {show(result)}", flush=True)
    return result


def _vram(result: dict) -> str:
    if result.get("reclaimed_bytes") is None:
        return "n/a, no GPU"
    return f"{result['reclaimed_bytes'] / 2**20:.0f} MiB, complete: {result['reclaim_complete']}"


def _status_lines(status: Mapping[str, Any]) -> list[str]:
    """What a person asks of ``status()`` at the end of the tour: which mode
    runs where, in which process, at what cost; the rest is for programs."""
    rss = status.get("worker_rss_bytes")
    memory = f"{rss / 2**20:.0f} MiB RSS" if rss else "RSS unknown"
    if status.get("worker_vram_bytes") is not None:
        memory += f", {status['worker_vram_bytes'] / 2**20:.0f} MiB VRAM"
    lines = [
        f"status(): {status['state']}, mode {status['mode']!r} in worker pid {status['worker_pid']} "
        f"on {status['device']} ({memory})",
        f"          {status['jobs_done']} jobs done, {status['queued']} queued, {status['restarts']} restarts",
    ]
    if status.get("gpu_unavailable"):
        lines.append(f"          no GPU: {status['gpu_unavailable']}")
    return lines


def run_tour() -> int:
    print("gpuvisor tour: built-in config, no GPU needed\n")
    with Supervisor() as sup:
        _step(
            "switch_mode('diag')",
            lambda: sup.switch_mode("diag").result(),
            lambda r: f"{r['status']}, worker pid {r['pid']}",
        )
        _step("submit('echo', {'x': 1})", lambda: sup.submit("echo", {"x": 1}).result())
        _step("submit('pid')", lambda: sup.submit("pid").result(), lambda r: f"worker pid {r}")
        _step(
            "switch_mode('diag') again",
            lambda: sup.switch_mode("diag").result(),
            lambda r: f"{r['status']}, same pid {r['pid']}",
        )
        r = _step(
            "switch_mode('embed')  (kills diag, loads model)",
            lambda: sup.switch_mode("embed").result(),
            lambda r: f"{r['status']}, worker pid {r['pid']}, model load {r['load_seconds']:.2f}s",
        )
        vectors = _step(
            "submit('embed', texts=[3 sentences])",
            lambda: sup.submit(
                "embed",
                {"texts": ["A man plays the guitar.", "Someone is playing a guitar.", "The stock market fell today."]},
            ).result(),
            lambda v: f"a {v.dtype} array of shape {v.shape}",
        )
        dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
        print(
            f"            cosine(paraphrase) = {dot(vectors[0], vectors[1]):.3f}, cosine(unrelated) = {dot(vectors[0], vectors[2]):.3f}"
        )
        _step(
            "switch_mode('generate')  (kills embed)",
            lambda: sup.switch_mode("generate").result(),
            lambda r: (
                f"{r['status']}, pid {r['pid']}; the embed worker's {(r['previous_rss_bytes'] or 0) / 2**20:.0f} MiB RSS "
                f"gone in {r['reclaim_seconds']:.3f}s (VRAM reclaimed: {_vram(r)})"
            ),
        )
        stream = _step(
            "submit('generate', stream=True)",
            lambda: sup.submit("generate", {"prompt": "Once upon a time", "max_new_tokens": 8}, stream=True),
            lambda s: "a JobStream",
        )
        tokens = [chunk["token"] for chunk in stream]
        print(f"            streamed tokens {tokens}, text {stream.result()['text']!r}")
        print("            (the built-in generate model is tiny, with RANDOM weights: its text is gibberish)")
        _step(
            "submit('chat', messages=[user: 'Hi'])",
            lambda: sup.submit("chat", {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 8}).result(),
            lambda r: f"{len(r['tokens'])} tokens after a {r['prompt_tokens']}-token prompt (its chat template)",
        )
        _step(
            "submit('echo', mode='diag')  (switches back)",
            lambda: sup.submit("echo", "back in diag", mode="diag").result(),
        )
        try:
            sup.submit("fail", {"message": "on purpose"}).result()
        except Exception as exc:  # noqa: BLE001 - the tour shows the error type
            print(f"            submit('fail') raised {type(exc).__name__}: {exc}")
        for line in _status_lines(sup.status()):
            print(f"            {line}")
        print("  leaving the block: queued jobs finish, the worker gets DRAIN, exits 0, is joined")
        started = time.perf_counter()
    print(
        f"  {time.perf_counter() - started:7.3f}s  shutdown(drain=True) (worker pid {r['pid']} long gone; diag worker drained)"
    )
    return 0
