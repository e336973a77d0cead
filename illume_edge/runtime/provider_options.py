"""onnxruntime execution-provider options: from the engine's manifest, the environment and the caller.

Each source is a mapping provider name -> {option: value}, e.g.

    {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": 4294967296}}

- the engine's `manifest.json`, key `provider_options` (what whoever deploys the engine folder wants there:
  a Jetson's memory limit, say),
- the environment, `ILLUME_EDGE_PROVIDER_OPTIONS` (the same as JSON),
- the caller, `SessionOptions.provider_options` (`--provider-option PROVIDER:KEY=VALUE` on the command line),
merged in that order, later sources overriding an option of the same provider. Values go to onnxruntime as
strings (booleans as "1" / "0"). Options of a provider a session does not use are ignored; onnxruntime
itself rejects an option name its provider does not know, when the session is created.

Three options belong to the runtime and are refused here: `device_id` (`SessionOptions.device_id`, which
also places the request buffers), `enable_cuda_graph` (`SessionOptions.cuda_graph`, which also makes the
runner replay the decode step under graph ids; a graph captured without them would replay stale shapes) and
`user_compute_stream` (`SessionOptions.compute_stream`: the runtime lets runs on it return unsynchronized,
which is only safe on a stream whose other work the runtime orders itself).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ..manifest import EngineError

ENV = "ILLUME_EDGE_PROVIDER_OPTIONS"
ProviderOptions = dict[str, dict[str, str]]
# The providers that run on a CUDA device: they take the session's device id and a caller's CUDA stream
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
RESERVED = {"device_id": "SessionOptions.device_id", "enable_cuda_graph": "SessionOptions.cuda_graph / --cuda-graph",
            "user_compute_stream": "SessionOptions.compute_stream (the sampling kernel's stream)"}


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (str, int, float)):
        return str(v)
    raise EngineError(f"{where}: expected a string, number or boolean, got {type(v).__name__} {v!r}")


def check_provider_options(value: Any, where: str) -> ProviderOptions:
    """`value` as provider options (strings throughout), or an EngineError naming `where`, the key and the
    expected form."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EngineError(f"{where}: expected an object {{provider: {{option: value}}}}, got {type(value).__name__}")
    out: ProviderOptions = {}
    for provider, opts in value.items():
        if not isinstance(provider, str) or not provider.endswith("ExecutionProvider"):
            raise EngineError(f"{where}: {provider!r} is not a provider name (e.g. 'CUDAExecutionProvider')")
        if not isinstance(opts, Mapping):
            raise EngineError(f"{where}.{provider}: expected an object {{option: value}}, got {type(opts).__name__}")
        for key in opts:
            if key in RESERVED:
                raise EngineError(f"{where}.{provider}.{key}: set by the runtime; use {RESERVED[key]} instead")
        out[provider] = {str(k): _value(v, f"{where}.{provider}.{k}") for k, v in opts.items()}
    return out


def from_environment() -> ProviderOptions:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EngineError(f"{ENV}: not valid JSON ({e}); expected e.g. "
                          f"'{{\"CUDAExecutionProvider\": {{\"cudnn_conv_algo_search\": \"HEURISTIC\"}}}}'") from None
    return check_provider_options(value, ENV)


def parse_cli(items: list[str] | None) -> ProviderOptions:
    """`--provider-option PROVIDER:KEY=VALUE` items as provider options."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        provider, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not (sep and eq and provider and key):
            raise EngineError(f"--provider-option {item!r}: expected PROVIDER:KEY=VALUE, e.g. "
                              f"CUDAExecutionProvider:cudnn_conv_algo_search=HEURISTIC")
        out.setdefault(provider, {})[key] = value
    return check_provider_options(out, "--provider-option")


def merge(*layers: ProviderOptions) -> ProviderOptions:
    """Later layers override earlier ones, option by option."""
    out: ProviderOptions = {}
    for layer in layers:
        for provider, opts in layer.items():
            out.setdefault(provider, {}).update(opts)
    return out


def provider_list(providers: list[str], options: ProviderOptions, device_id: int, cuda_graph: bool,
                  compute_stream: int | None = None) -> list:
    """`providers` as onnxruntime's InferenceSession takes them: (name, options) where there are options. The
    CUDA and TensorRT providers always get the session's device id, and `compute_stream` (a CUDA stream
    handle) as `user_compute_stream` where one is given; the CUDA provider `enable_cuda_graph` when its
    session replays CUDA graphs."""
    out: list = []
    for p in providers:
        opts = dict(options.get(p, {}))
        if p in GPU_PROVIDERS:
            opts["device_id"] = str(device_id)
            if compute_stream is not None:
                opts["user_compute_stream"] = str(int(compute_stream))
        if p == "CUDAExecutionProvider" and cuda_graph:
            opts["enable_cuda_graph"] = "1"
        out.append((p, opts) if opts else p)
    return out
