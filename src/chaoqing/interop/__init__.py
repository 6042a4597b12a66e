"""chaoqing's models behind model servers that others wrote (Seldon MLServer:
:mod:`chaoqing.interop.mlserver_model`). Nothing here runs in the gateway."""
