"""Which device a worker gets: decided in the supervisor from the config's
``device`` setting and what NVML sees, handed to the worker as its
environment (``CUDA_VISIBLE_DEVICES``). Never touches CUDA."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.config import BAD_DEVICE_SETTING, device_names, valid_device_setting
from supervisor.engine.gpu import device_count, identity, nvml


@dataclass(frozen=True)
class DeviceChoice:
    """The device the worker gets, decided in the supervisor from NVML.

    ``index`` is the NVML index of the GPU to meter: None on cpu, and None
    also where the GPU cannot be named (``auto`` honouring a
    ``CUDA_VISIBLE_DEVICES`` NVML cannot map); ``reason`` then says VRAM
    cannot be verified. ``env`` goes into the worker's environment, over
    the supervisor's own. A pinned worker sees exactly one GPU, as
    ``cuda:0``: its mode arguments should say ``"cuda"``, not ``"cuda:N"``.
    """

    setting: str  # what the config said: "auto" | "cpu" | "cuda:N"
    kind: str  # "cpu" or "cuda"
    index: int | None
    env: dict[str, str]
    reason: str  # one line for the log and status(): why this device


def _cpu(setting: str, reason: str) -> DeviceChoice:
    return DeviceChoice(setting, "cpu", None, {"CUDA_VISIBLE_DEVICES": ""}, reason)


def _pinned(setting: str, nv: Any, index: int, why: str) -> DeviceChoice:
    """``cuda`` on NVML device ``index``. The worker is pinned by the GPU's
    UUID: NVML's numbering and CUDA's can differ (CUDA's default order is
    fastest first, and NVML promises no order across reboots), a UUID
    cannot. Without a UUID, the number in PCI bus order, which is how NVML
    numbers in practice."""
    name, uuid, problem = identity(nv, index)
    env = {"CUDA_VISIBLE_DEVICES": uuid or str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    what = f"{name} ({uuid})" if uuid else f"NVML device {index} (name unknown: {problem})"
    return DeviceChoice(setting, "cuda", index, env, f"{why}: {what}")


def _honour_visible(nv: Any, count: int, visible: str, order: str | None) -> DeviceChoice:
    """``auto`` when the supervisor's own environment already sets
    ``CUDA_VISIBLE_DEVICES`` (a service pinned to a GPU by its unit file):
    the worker inherits it unchanged, and the GPU it names is metered when
    NVML can tell which one that is. CUDA uses the first entry as cuda:0."""
    setting = "auto"
    first = visible.split(",")[0].strip()
    said = f"auto: CUDA_VISIBLE_DEVICES={visible!r} in the supervisor's environment"
    if not first or first.startswith("-"):
        return _cpu(setting, f"{said} hides every GPU")
    index: int | None = None
    if first.isascii() and first.isdigit():
        number = int(first)
        if number >= count:
            return _cpu(setting, f"{said} names no GPU NVML sees ({count})")
        if order == "PCI_BUS_ID" or count == 1:
            index = number
    elif first.startswith("GPU-"):  # CUDA takes a unique prefix of the UUID
        matches = [i for i in range(count) if identity(nv, i)[1].startswith(first)]
        index = matches[0] if len(matches) == 1 else None
    if index is None:
        return DeviceChoice(
            setting,
            "cuda",
            None,
            {},
            f"{said}, which NVML cannot map to one of its {count} GPUs, so VRAM cannot be verified "
            "(use a GPU UUID, or CUDA_DEVICE_ORDER=PCI_BUS_ID, or set device = 'cuda:N')",
        )
    name, uuid, _ = identity(nv, index)
    return DeviceChoice(setting, "cuda", index, {}, f"{said}: NVML device {index}, {name} ({uuid})")


def choose_device(setting: str, environ: Mapping[str, str] | None = None) -> DeviceChoice:
    """Decide the worker's device from the config's ``device`` setting.

    * ``"cpu"``: every GPU hidden from the worker (``CUDA_VISIBLE_DEVICES=""``).
    * ``"cuda:N"``: the worker sees NVML device N alone. ``ValueError`` when
      NVML works and has no device N. Without NVML the worker is pinned all
      the same (the user asked for it), and ``reason`` says VRAM cannot be
      verified.
    * ``"auto"``: ``cuda:0`` when NVML sees a GPU, else cpu; but a
      ``CUDA_VISIBLE_DEVICES`` already in ``environ`` (default: this
      process's environment) is honoured, not overridden.

    Anything else raises ``ValueError``. Never raises for an NVML failure.
    """
    if not valid_device_setting(setting):
        raise ValueError(BAD_DEVICE_SETTING.format(setting))
    if setting == "cpu":
        return _cpu(setting, "cpu: set in the configuration; CUDA_VISIBLE_DEVICES='' hides every GPU from the worker")
    environ = os.environ if environ is None else environ
    nv, problem = nvml()
    count: int | None = None
    if nv is not None:
        count, problem = device_count(nv)
    if setting == "auto":
        if count is None or count == 0:
            return _cpu(setting, f"auto: NVML sees no GPU ({problem or '0 devices'})")
        if "CUDA_VISIBLE_DEVICES" in environ:
            return _honour_visible(nv, count, environ["CUDA_VISIBLE_DEVICES"], environ.get("CUDA_DEVICE_ORDER"))
        return _pinned(setting, nv, 0, f"auto: NVML sees {count} GPU{'s' if count != 1 else ''}, using cuda:0")
    index = int(setting.removeprefix("cuda:"))
    if count is None:
        env = {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        return DeviceChoice(
            setting,
            "cuda",
            index,
            env,
            f"{setting}: set in the configuration; NVML is unavailable ({problem}), so VRAM cannot be verified",
        )
    if index >= count:
        seen = {0: "NVML sees no GPU", 1: "NVML sees 1 GPU (cuda:0)"}.get(count)
        seen = seen or f"NVML sees {count} GPUs (cuda:0 to cuda:{count - 1})"
        raise ValueError(f"device {setting!r}: there is no such GPU; {seen}")
    why = f"{setting}: set in the configuration"
    if "CUDA_VISIBLE_DEVICES" in environ:
        why += f" (over CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} in the supervisor's environment)"
    return _pinned(setting, nv, index, why)


def choose_devices(
    settings: tuple[str, ...] | str, environ: Mapping[str, str] | None = None
) -> list[tuple[str, DeviceChoice]]:
    """Every device the supervisor drives, named (see ``device_names``):
    ``"auto"`` is every GPU NVML sees (``cuda:0`` ...), or the CPU when it
    sees none; a list is each of its entries, as ``choose_device`` decides
    it. With several devices each worker is pinned to its own, so a GPU's
    worker sees that GPU alone."""
    if settings == "auto":
        nv, problem = nvml()
        count = device_count(nv)[0] if nv is not None else None
        if not count:
            return [("cpu", _cpu("auto", f"devices = auto: NVML sees no GPU ({problem or '0 devices'})"))]
        return [(f"cuda:{i}", _pinned(f"cuda:{i}", nv, i, f"devices = auto: GPU {i} of {count}")) for i in range(count)]
    if isinstance(settings, str):
        raise ValueError(f"devices must be 'auto' or a list, got {settings!r}")
    if len(settings) == 1:
        choice = choose_device(settings[0], environ)  # "auto" is named for what it chose
        return [(choice.kind if choice.index is None else f"cuda:{choice.index}", choice)]
    return [(name, choose_device(s, environ)) for name, s in zip(device_names(settings), settings, strict=True)]
