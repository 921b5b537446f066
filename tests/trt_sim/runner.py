"""Run a serialised engine the way a device runtime does, with only API names that TensorRT
8.6, 10.x and 11.x all have: Runtime.deserialize_cuda_engine, num_io_tensors / get_tensor_name /
get_tensor_mode / get_tensor_shape, set_input_shape, set_tensor_address, execute_async_v3.
Device buffers come from the (simulated) pycuda driver, as on the board."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def run_engine(trt: ModuleType, plan: bytes, inputs: np.ndarray) -> np.ndarray:
    """Logits for float32 NCHW ``inputs`` from the engine in ``plan``."""
    import pycuda.autoinit  # noqa: F401 - the CUDA context, as a device runtime makes it
    import pycuda.driver as cuda

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("the plan did not deserialise")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    assert len(in_names) == 1 and len(out_names) == 1, (in_names, out_names)
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if not context.set_input_shape(in_names[0], x.shape):
        raise RuntimeError(f"set_input_shape{x.shape} refused")
    out_shape = tuple(context.get_tensor_shape(out_names[0]))
    out = np.empty(out_shape, dtype=np.float32)
    d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(out.nbytes)
    stream = cuda.Stream()
    try:
        cuda.memcpy_htod_async(d_in, x, stream)
        context.set_tensor_address(in_names[0], int(d_in))
        context.set_tensor_address(out_names[0], int(d_out))
        if not context.execute_async_v3(stream.handle):
            raise RuntimeError("execute_async_v3 failed")
        cuda.memcpy_dtoh_async(out, d_out, stream)
        stream.synchronize()
    finally:
        d_in.free()
        d_out.free()
    return out
