"""What both programs speak: the KServe v2 tensor codec and the listening sockets.

Imported by the gateway and by the model server; imports neither of them.
"""
