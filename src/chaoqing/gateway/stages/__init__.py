"""The pipeline's stages: pure image and face code, arrays in, new arrays out.

One module per stage (decode, detect, enhance_faces, face_geometry, composite, tiling,
resize, encode, upscale). They run in the gateway process, mostly on gevent's threadpool;
none imports the web framework.
"""
