"""Runtimes and probes on the board.

- :mod:`device.predictor`: one predictor interface (``Predictor``: ``predict(uint8 NHWC) -> logits``,
  ``class_names``, ``max_batch``, ``close()``) over TensorRT (pycuda buffers), onnxruntime and
  PyTorch; ``open_predictor(ws, backend)`` and ``predict_images(ws, paths, backend)`` for a workspace.
- :mod:`device.bench`: latency percentiles, images/s and memory per backend (``bench``,
  ``compare_backends``).
- :mod:`device.probes`: the board's memory picture (tegrastats, ``/proc/meminfo`` with NvMap); the
  measuring it builds on (resident size, meminfo, the CUDA allocator, the peak sampler) is the
  core's, in :mod:`edge_m2kd.memory`, because device/ may import the core but not the reverse.

Nothing is imported here; TensorRT and pycuda are imported only when a TensorRT predictor is opened.
"""
