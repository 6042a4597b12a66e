"""chaoqing's models behind model servers that others wrote: KServe's Python model server
(:mod:`chaoqing.interop.kserve_model`) and Seldon MLServer (:mod:`chaoqing.interop.mlserver_model`),
with what both share in :mod:`chaoqing.interop.hosted`. Nothing here runs in the gateway."""
