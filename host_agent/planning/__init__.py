"""Planning: the optimizer, which turns a batch of instructions into a plan.

``chain`` is the framework (checks, the baseline plan, the policy chain), one module per
policy (``passthrough``, ``merge``, ``timing``, ``colocate``), ``hostload`` the reading of a
host's busyness that the timing policy judges, ``fleet`` merge across hosts and the state
it keeps, ``service`` the gRPC service and its client.
Planning knows the model, never storage: it runs on a machine without backup media.
"""
