"""The ``passthrough`` policy: the baseline plan, unchanged.

Returns the plan unchanged: one unit per disk per instruction, in order.
"""
from __future__ import annotations

from collections.abc import Sequence

from host_agent.model import Instruction, Plan
from host_agent.planning.chain import HostContext, PlanningPolicy


class Passthrough(PlanningPolicy):
    """One unit per disk per instruction, in order: the baseline, unchanged."""

    name = "passthrough"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        return plan
