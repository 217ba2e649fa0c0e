"""Media: repositories on one host served to the agents of other hosts over gRPC.

``server`` is the media service (``hyperback-media``), ``client`` the repository an agent
reaches through it, ``codec`` what both sides share: message pieces, snapshot documents, the
errors that cross the wire. Specified in ``docs/media-protocol.md``.
"""
