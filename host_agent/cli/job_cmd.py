"""hyperback job: the agent's jobs (guests', operators', schedules'): list them, cancel one."""
from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent.cli.agentapi import add_agent_argument, call, operator, when


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("job", help="list or cancel the agent's jobs",
                       description="The host agent's jobs: every backup or restore a guest, an operator or "
                                   "a schedule asked for, newest first.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--domain", default="", help="only this domain's (name or uuid)")
    ls.add_argument("--json", action="store_true", help="print the jobs as JSON")
    add_agent_argument(ls)
    ls.set_defaults(run=run_list)
    cancel = actions.add_parser(
        "cancel", help="cancel a queued or running job",
        description="A waiting job is dropped at once. A running backup stops at its next chunk and "
                    "publishes nothing; its VM keeps running, thawed. A backup whose snapshot is already "
                    "written cannot be cancelled any more: it succeeds.")
    cancel.add_argument("job_id", metavar="JOB", help="the job's id (see 'hyperback job list')")
    add_agent_argument(cancel)
    cancel.set_defaults(run=run_cancel)


def run_list(args: argparse.Namespace) -> int:
    with operator(args) as (stub, address):
        jobs = call(stub.ListJobs, pb.ListJobsRequest(domain=args.domain, page_size=200), address).jobs
    if args.json:
        print(json.dumps([MessageToDict(j, preserving_proto_field_name=True) for j in jobs]))
        return 0
    for j in jobs:
        origin = pb.JobOrigin.Name(j.origin).removeprefix("JOB_ORIGIN_").lower()
        if j.schedule:
            origin = f"schedule {j.schedule}"
        print(f"{j.id}  {pb.JobState.Name(j.state).removeprefix('JOB_STATE_').lower():<9} "
              f"{j.domain_name:<20} {origin:<18} {when(j.created_at)}  {j.detail}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    with operator(args) as (stub, address):
        job = call(stub.CancelJob, pb.CancelJobRequest(job_id=args.job_id), address).job
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    print(f"job {job.id}: {state}: {job.detail}")
    return 0
