"""What an in-process cleanup leaves on the GPU: the baseline gpuvisor's
switch is compared with (tests/test_gpu.py runs this in a subprocess).

In ONE process: read NVML device used (the baseline), import torch, load the
generate mode's model onto CUDA exactly as the worker does
(``worker.modes.generate.load`` with the arguments the test gives: a
random-weight GPT-2 built from a config), generate a few tokens, then drop
every reference, ``gc.collect()`` and
``torch.cuda.empty_cache()``, and measure what stays: the CUDA context,
cuBLAS/cuDNN workspaces and whatever the caching allocator keeps. Prints one
JSON line on stdout; everything else goes to stderr.

Usage: ``python tests/helpers/gpu_inprocess_probe.py NVML_INDEX LOAD_ARGS_JSON``, with the
worker's ``CUDA_VISIBLE_DEVICES`` (from ``choose_device``) in the environment
so that CUDA's device 0 is the GPU NVML measures.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from supervisor.engine.gpu import GpuMeter  # noqa: E402 - after the path is set

PROMPT = {"prompt": "hello", "max_new_tokens": 8}


def used(meter: GpuMeter) -> int:
    memory = meter.memory()
    if memory is None:
        raise SystemExit(f"cannot read GPU memory: {meter.last_error}")
    return memory[0]


def _finish(chunks):
    """A generator handler's result: what its ``return`` gives once the chunks are read."""
    while True:
        try:
            next(chunks)
        except StopIteration as end:
            return end.value


def main() -> int:
    index = int(sys.argv[1])
    args = json.loads(sys.argv[2])
    meter = GpuMeter.open(index)
    if isinstance(meter, str):
        print(json.dumps({"error": meter}))
        return 2
    pid = os.getpid()
    baseline = used(meter)

    import torch

    from worker.modes.generate import load

    handlers = load(**args)
    text = _finish(handlers["generate"](PROMPT))
    torch.cuda.synchronize()
    assert text
    loaded_used = used(meter)
    loaded_process = meter.process_bytes(pid)
    loaded_reserved = int(torch.cuda.memory_reserved())

    del handlers, text  # the model lives in the handlers' closure
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()

    after_used = used(meter)
    print(
        json.dumps(
            {
                "pid": pid,
                "gpu": meter.snapshot(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "torch": torch.__version__,
                "baseline_used": baseline,
                "loaded_used": loaded_used,
                "loaded_process_bytes": loaded_process,
                "loaded_torch_reserved": loaded_reserved,
                "after_used": after_used,
                "stays_device_bytes": after_used - baseline,
                "stays_process_bytes": meter.process_bytes(pid),
                "stays_torch_allocated": int(torch.cuda.memory_allocated()),
                "stays_torch_reserved": int(torch.cuda.memory_reserved()),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
