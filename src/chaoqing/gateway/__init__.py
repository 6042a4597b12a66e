"""The gateway process: HTTP API, the concurrent pipeline, the v2 client, the image stages.

Never imports :mod:`chaoqing.modelserver` nor any model runtime (ncnn, dlib, onnxruntime,
openvino, torch, ray): models live in model-server processes, reached over HTTP.
"""
