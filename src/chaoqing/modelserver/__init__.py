"""The model-server process: KServe v2 over HTTP, a dynamic batcher, and the runners.

Never imports :mod:`chaoqing.gateway`.
"""
