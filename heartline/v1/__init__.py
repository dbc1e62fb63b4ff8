"""Generated protobuf and gRPC code for the ``heartline.v1`` wire contract.

Do not edit the ``*_pb2*`` modules: change ``protos/heartline/v1/*.proto`` and run
``python scripts/gen_protos.py``.
"""
