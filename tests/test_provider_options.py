"""onnxruntime provider options (runtime/provider_options.py): the manifest's, the environment's and the
caller's, checked with errors that name the source and key, merged in that order, and handed to onnxruntime
with the runtime's own device id and CUDA-graph flag."""
import json
import shutil

import pytest

from illume_edge import cli
from illume_edge.manifest import EngineError
from illume_edge.runtime.engine import Engine
from illume_edge.runtime.provider_options import (ENV, check_provider_options, from_environment, merge,
                                                  parse_cli, provider_list)
from illume_edge.runtime.session import SessionOptions

CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def test_values_become_strings_and_bad_options_name_their_source():
    got = check_provider_options({CUDA: {"gpu_mem_limit": 1 << 32, "do_copy_in_default_stream": True,
                                         "cudnn_conv_algo_search": "HEURISTIC"}}, "x")
    assert got == {CUDA: {"gpu_mem_limit": "4294967296", "do_copy_in_default_stream": "1",
                          "cudnn_conv_algo_search": "HEURISTIC"}}
    assert check_provider_options(None, "x") == {}
    cases = [([CUDA], r"src: expected an object \{provider"),
             ({"cuda": {}}, r"src: 'cuda' is not a provider name"),
             ({CUDA: "HEURISTIC"}, r"src\.CUDAExecutionProvider: expected an object \{option: value\}"),
             ({CUDA: {"gpu_mem_limit": [1]}}, r"src\.CUDAExecutionProvider\.gpu_mem_limit: expected a string"),
             ({CUDA: {"enable_cuda_graph": "1"}}, r"enable_cuda_graph: set by the runtime.*--cuda-graph"),
             ({TRT: {"device_id": "1"}}, r"device_id: set by the runtime; use SessionOptions\.device_id"),
             ({CUDA: {"user_compute_stream": "140234"}}, r"user_compute_stream: set by the runtime; use "
                                                         r"SessionOptions\.compute_stream")]
    for value, message in cases:
        with pytest.raises(EngineError, match=message):
            check_provider_options(value, "src")


def test_environment_and_command_line(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({CUDA: {"arena_extend_strategy": "kSameAsRequested"}}))
    assert from_environment() == {CUDA: {"arena_extend_strategy": "kSameAsRequested"}}
    monkeypatch.setenv(ENV, "{CUDA: 1}")
    with pytest.raises(EngineError, match=f"{ENV}: not valid JSON.*cudnn_conv_algo_search"):
        from_environment()
    monkeypatch.delenv(ENV)
    assert from_environment() == {}
    assert parse_cli([f"{CUDA}:cudnn_conv_algo_search=HEURISTIC", f"{CUDA}:gpu_mem_limit=1024",
                      f"{TRT}:trt_fp16_enable=1"]) == {
        CUDA: {"cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": "1024"}, TRT: {"trt_fp16_enable": "1"}}
    assert parse_cli(None) == {}
    for bad in ("cudnn_conv_algo_search=HEURISTIC", f"{CUDA}:gpu_mem_limit", f"{CUDA}:=1"):
        with pytest.raises(EngineError, match="expected PROVIDER:KEY=VALUE"):
            parse_cli([bad])


def test_the_runtimes_own_options_go_with_the_callers():
    options = {CUDA: {"cudnn_conv_algo_search": "HEURISTIC"}, CPU: {}}
    assert provider_list([CUDA, CPU], options, 1, cuda_graph=True) == [
        (CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "device_id": "1", "enable_cuda_graph": "1"}), CPU]
    assert provider_list([TRT, CUDA, CPU], {}, 0, cuda_graph=False) == [
        (TRT, {"device_id": "0"}), (CUDA, {"device_id": "0"}), CPU]
    assert provider_list([CPU], options, 0, cuda_graph=True) == [CPU]  # other providers' options are ignored
    # the sampling kernel's stream, for both GPU providers (SessionOptions.compute_stream)
    assert provider_list([TRT, CUDA, CPU], {}, 0, cuda_graph=True, compute_stream=0x7F00AB) == [
        (TRT, {"device_id": "0", "user_compute_stream": str(0x7F00AB)}),
        (CUDA, {"device_id": "0", "user_compute_stream": str(0x7F00AB), "enable_cuda_graph": "1"}), CPU]
    assert merge({CUDA: {"a": "1", "b": "1"}}, {CUDA: {"b": "2"}, TRT: {"c": "3"}}, {CUDA: {"a": "4"}}) == {
        CUDA: {"a": "4", "b": "2"}, TRT: {"c": "3"}}


def test_an_engine_merges_manifest_environment_and_caller(tiny_engine, tmp_path, monkeypatch):
    src = tiny_engine("tiny-plus")[0]
    dst = tmp_path / "engine"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["provider_options"] = {CUDA: {"gpu_mem_limit": 2048, "cudnn_conv_algo_search": "EXHAUSTIVE"}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(ENV, json.dumps({CUDA: {"cudnn_conv_algo_search": "HEURISTIC"}}))
    engine = Engine.load(dst, SessionOptions(provider_options={CUDA: {"gpu_mem_limit": 4096}}), check_hash=False)
    assert engine.options.provider_options == {CUDA: {"gpu_mem_limit": "4096", "cudnn_conv_algo_search": "HEURISTIC"}}
    assert engine.session("head_text").providers == [CPU]  # this onnxruntime: CPU only; the CUDA options wait

    manifest["provider_options"] = {CUDA: {"enable_cuda_graph": 1}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"manifest.json: provider_options\.CUDAExecutionProvider\.enable_cuda_graph"):
        Engine.load(dst, check_hash=False)
    manifest["provider_options"] = "HEURISTIC"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"manifest.json: manifest.provider_options: expected an object"):
        Engine.load(dst, check_hash=False)


def test_cli_refuses_a_malformed_provider_option(tiny_engine, capsys):
    engine = tiny_engine("tiny-plus")[0]
    rc = cli.main(["generate", "--engine", str(engine), "--out", "unused.png", "--provider-option",
                   "CUDAExecutionProvider=HEURISTIC", "a red circle"])
    assert rc == 2 and "expected PROVIDER:KEY=VALUE" in capsys.readouterr().err
