"""hyperback schedule: the agent's schedules, when they ran and when they run next."""
from __future__ import annotations

import argparse
import json

import grpc
from google.protobuf.json_format import MessageToDict

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.cli.agentapi import add_agent_argument, call, operator, when
from host_agent.protobuf import policy_from_pb


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schedule", help="show the agent's backup schedules",
                       description="The [[schedules]] of the agent's config (docs/agent.md): the domains "
                                   "each covers now, its last and next run, and its retention.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="list the schedules")
    ls.add_argument("--json", action="store_true", help="print the schedules as JSON")
    add_agent_argument(ls)
    ls.set_defaults(run=run_list)
    now = actions.add_parser("run", help="run a schedule now",
                             description="Back up every domain the schedule covers now, as if its time had "
                                         "come; its retention follows. Prints the jobs started.")
    now.add_argument("name", metavar="SCHEDULE")
    now.add_argument("--wait", action="store_true",
                     help="wait until its jobs have finished, print how each ended, and exit 3 if one failed")
    add_agent_argument(now)
    now.set_defaults(run=run_now)


def run_list(args: argparse.Namespace) -> int:
    with operator(args) as (stub, address):
        schedules = call(stub.ListSchedules, pb.ListSchedulesRequest(), address).schedules
    if args.json:
        print(json.dumps([MessageToDict(s, preserving_proto_field_name=True) for s in schedules]))
        return 0
    if not schedules:
        print("no schedules: add [[schedules]] tables to the agent's config (docs/agent.md)")
    for s in schedules:
        what = {"verify": f"boot verification to {s.destination}",
                "copy": f"copy from {s.destination} to {s.copy_to}"}.get(
            s.kind, f"{policy_from_pb(s.policy, 'Schedule').value} to {s.destination}")
        print(f"{s.name}: '{s.calendar}' {what}; {s.selector} "
              f"({', '.join(s.domains) or 'no domain now'}); last {when(s.last_run_at)}, "
              f"next {when(s.next_run_at)}; {s.retention or 'keeps everything'}")
    return 0


def run_now(args: argparse.Namespace) -> int:
    with operator(args) as (stub, address):
        answer = call(stub.RunSchedule, pb.RunScheduleRequest(name=args.name), address)
        for job in answer.jobs:
            print(f"job {job.id}: {job.domain_name}", flush=True)
        for line in answer.skipped:
            print(f"skipped: {line}")
        if not answer.jobs and not answer.skipped:
            print(f"schedule {args.name} covers no domain now")
        if not args.wait:
            return 0
        failed = 0
        for job in answer.jobs:
            last = final_event(stub, job.id, address)
            state = pb.JobState.Name(last.state).removeprefix("JOB_STATE_").lower()
            print(f"job {job.id}: {job.domain_name}: {state}: {last.message}")
            failed += last.state != pb.JOB_STATE_SUCCEEDED
    if failed:
        raise errors.EnvironmentProblem(f"{failed} of {len(answer.jobs)} job(s) of schedule {args.name} "
                                        "did not succeed ('hyperback job list' says why)")
    return 0


def final_event(stub: pb_grpc.OperatorStub, job_id: str, address: str) -> pb.JobEvent:
    """Follow a job's events until the last one."""
    try:
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            if event.final:
                return event
    except grpc.RpcError as e:
        raise errors.EnvironmentProblem(f"lost the agent at {address} while waiting for job {job_id}: "
                                        f"{e.details()}") from None
    raise errors.EnvironmentProblem(f"the agent at {address} stopped reporting job {job_id}")
