"""device_buffer: request buffers allocated on the sessions' device and bound by address.

The GPU route (OrtValue-owned memory) runs here with the device string "cpu"; what a GPU adds is only
where onnxruntime puts the allocation."""
import numpy as np
import pytest

from illume_edge.manifest import EngineError
from illume_edge.runtime.device_buffer import allocate


@pytest.mark.parametrize("owner", ["auto", "numpy", "ortvalue"])
def test_views_address_the_right_elements_and_host_reads_them(owner):
    buf = allocate((4, 6), np.float32, owner=owner)
    assert buf.shape == (4, 6) and buf.nbytes == 96 and buf.device == "cpu"
    assert not buf.host().any()  # zero-filled
    view = buf.view(6, (2, 3))  # elements 6..11: the second row of the [4, 6] buffer
    assert view.address == buf.address + 6 * 4 and view.shape == (2, 3)
    # write through the owning memory, read back through the view
    if owner == "ortvalue":
        memory = buf._memory.numpy()  # an OrtValue on "cpu" wraps host memory: write it via numpy's view
        assert memory.ctypes.data == buf.address
        memory.reshape(-1)[:] = np.arange(24)
    else:
        buf.host().reshape(-1)[:] = np.arange(24)
    np.testing.assert_array_equal(view.host(), np.arange(6, 12).reshape(2, 3))
    np.testing.assert_array_equal(view.view(3, (3,)).host(), [9, 10, 11])  # a view of a view
    assert (view.host() is view.host()) == (owner != "ortvalue")  # numpy memory: the memory itself


def test_bad_views_and_owners_fail_clearly():
    buf = allocate((10,), np.int64)
    with pytest.raises(EngineError, match="outside its 10"):
        buf.view(8, (3,))
    with pytest.raises(EngineError, match="outside"):
        buf.view(-1, (2,))
    with pytest.raises(EngineError, match="owner must be one of"):
        allocate((2,), np.float32, owner="cupy")
    with pytest.raises(EngineError, match="numpy memory is host memory"):
        allocate((2,), np.float32, device="cuda", owner="numpy")


def test_a_gpu_buffer_without_a_gpu_build_names_the_fix():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: CUDA buffers can be allocated")
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        allocate((2,), np.float32, device="cuda")


def test_device_arrays_are_checked_against_the_contract_like_host_arrays(tiny_engine):
    """A DeviceArray input goes through the same contract check (dtype, rank, dynamic ranges) as a numpy one."""
    from illume_edge.runtime.engine import Engine
    from illume_edge.runtime.session import SessionOptions

    engine = Engine.load(tiny_engine("tiny-plus")[0], SessionOptions(buffers="ortvalue"))
    head = engine.session("head_text")
    hidden = head.allocate((2, engine.config.llm.hidden_size), np.float32)
    out = head.run({"hidden": hidden})["logits"]
    np.testing.assert_array_equal(out, head.run({"hidden": np.zeros((2, engine.config.llm.hidden_size),
                                                                     np.float32)})["logits"])
    with pytest.raises(EngineError, match="dtype int64, expected float32"):
        head.run({"hidden": head.allocate((2, engine.config.llm.hidden_size), np.int64)})
    with pytest.raises(EngineError, match="rank 1"):
        head.run({"hidden": hidden.view(0, (engine.config.llm.hidden_size,))})


def test_a_scalar_input_stays_a_scalar_through_the_binding(tmp_path):
    """A 0-d numpy input (e.g. a flag) keeps rank 0 when bound (np.ascontiguousarray would make it [1])."""
    import onnx
    from onnx import TensorProto, helper

    from illume_edge.manifest import Component, TensorSpec
    from illume_edge.runtime.session import Session

    graph = helper.make_graph([helper.make_node("Where", ["flag", "x", "y"], ["out"])], "scalar",
                              [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    spec = Component("onnx", (), (TensorSpec("flag", "bool", ()), TensorSpec("x", "float32", (2,)),
                                  TensorSpec("y", "float32", (2,))), (TensorSpec("out", "float32", (2,)),), {})
    session = Session("scalar", str(path), spec)
    x, y = np.array([1, 2], np.float32), np.array([3, 4], np.float32)
    binding = session.binding()
    binding.bind_inputs({"flag": np.array(True), "x": x, "y": y})
    binding.bind_outputs({}, ["out"])
    np.testing.assert_array_equal(binding.run()["out"], x)
    binding.bind_inputs({"flag": np.array(False)})
    np.testing.assert_array_equal(binding.run()["out"], y)
