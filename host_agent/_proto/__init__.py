"""Modules generated from ``proto/`` at build time (see setup.py); gitignored, never edited by hand.

``from host_agent._proto.hyperback.v1 import optimizer_pb2, optimizer_pb2_grpc`` after
``pip install -e .`` (or ``pip install .``) has run the build.
"""
