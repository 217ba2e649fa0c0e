"""The host agent: the systemd service that serves every VM's backup requests.

A request walks one way: ``channel`` (the VM's virtio-serial port) -> ``intake`` (validated
into an instruction) -> ``driver`` (batched) -> the optimizer (``planner``) -> ``executor``
(``views`` of the disks, the repositories) -> ``guests``, the one door answers leave through.
``daemon`` wires them; ``operator`` serves the operator gRPC API; ``domains``, ``jobs`` and
``journal`` keep what the agent knows. See ``docs/architecture.md``.
"""
