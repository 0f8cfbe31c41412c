"""``levante.v1``: generated from inference.proto by protos/generate.py; do not edit the *_pb2* files."""
