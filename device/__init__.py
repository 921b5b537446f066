"""Runtimes and probes on the board.

- :mod:`device.predictor`: one predictor interface (``Predictor``: ``predict(uint8 NHWC) -> logits``,
  ``class_names``, ``max_batch``, ``close()``) over TensorRT (pycuda buffers), onnxruntime and
  PyTorch; ``open_predictor(ws, backend)`` and ``predict_images(ws, paths, backend)`` for a workspace.
- :mod:`device.bench`: latency percentiles, images/s and memory per backend (``bench``,
  ``compare_backends``).
- :mod:`device.probes`: memory probes (tegrastats, ``/proc/meminfo`` with NvMap, the CUDA allocator).

Nothing is imported here, so ``import device.probes`` stays cheap; TensorRT and pycuda are imported
only when a TensorRT predictor is opened.
"""
