"""hyperback vm enable|disable|status: wire a libvirt domain in (or out), and see how it is wired.

``enable`` and ``disable`` change libvirt's own domain XML (``host_agent.agent.wiring``); ``status``
adds what the running agent knows (its operator API: guest connected, last backup, schedules),
or says the agent is not running.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from host_agent import config, hypervisor
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.agent import wiring
from host_agent.hypervisor import Guarded
from host_agent.tls.transport import NO_TLS, TlsConfig, channel


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm", help="wire a VM in or out, and show how it is wired",
                       description="Add (or remove) the hyperback channel and stable disk serials in a "
                                   "libvirt domain's XML, and show each domain's wiring and backups.")
    p.add_argument("--connect", metavar="URI", default=None,
                   help="libvirt URI (default: the agent config's libvirt_uri, qemu:///system)")
    p.add_argument("--config", metavar="PATH", type=Path, default=None,
                   help="agent config (default /etc/hyperback/agent.toml or $HYPERBACK_CONFIG)")
    vm = p.add_subparsers(dest="vm_command", metavar="ACTION")
    vm.required = True
    e = vm.add_parser("enable", help="add the channel and disk serials (persistent, and live if running)")
    e.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    e.add_argument("--group", action="append", default=[], metavar="NAME",
                   help="tag the domain with a group; schedules with group = NAME cover it (repeatable)")
    e.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    e.set_defaults(run=run_enable)
    d = vm.add_parser("disable", help="remove the channel; serials stay unless --remove-serials")
    d.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    d.add_argument("--remove-serials", action="store_true",
                   help="also drop the serials hyperback added (this orphans the disks' backup chains)")
    d.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    d.set_defaults(run=run_disable)
    s = vm.add_parser("status", help="channel, serials, guest, last backup and schedule of domains")
    s.add_argument("domain", metavar="DOMAIN", nargs="?", help="domain name or UUID (default: every domain)")
    s.add_argument("--json", action="store_true", help="print a JSON array for scripts")
    s.set_defaults(run=run_status)


@contextlib.contextmanager
def _connection(args: argparse.Namespace) -> Iterator[Guarded]:
    uri = args.connect or config.load(args.config).libvirt_uri
    conn = hypervisor.connect(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _print_report(report: wiring.Report, as_json: bool, nothing: str) -> None:
    if as_json:
        print(json.dumps(report.to_json()))
        return
    c = report.change
    lines = []
    if c.channel_added:
        lines.append("channel org.hyperback.agent.0 added to the persistent definition")
    if c.channel_removed:
        lines.append("channel org.hyperback.agent.0 removed from the persistent definition")
    lines += [f"disk {dev}: serial {serial} added" for dev, serial in sorted(c.serials_added.items())]
    lines += [f"disk {dev}: serial {serial} removed" for dev, serial in sorted(c.serials_removed.items())]
    lines += [f"tagged with group {group}" for group in c.groups_added]
    lines += report.live
    lines += [f"disk {dev}: skipped, {why}" for dev, why in sorted(c.skipped.items())]
    lines += report.pending
    if not report.changed:
        lines.insert(0, f"{report.domain}: {nothing}")
    else:
        lines.insert(0, f"{report.domain}:")
    print("\n  ".join(lines))


def run_enable(args: argparse.Namespace) -> int:
    with _connection(args) as conn:
        report = wiring.enable(conn, args.domain, tuple(args.group))
    _print_report(report, args.json, "already enabled (nothing changed)")
    return 0


def run_disable(args: argparse.Namespace) -> int:
    with _connection(args) as conn:
        report = wiring.disable(conn, args.domain, args.remove_serials)
    _print_report(report, args.json, "already disabled (nothing changed)")
    if not args.remove_serials and not args.json:
        print("  disk serials kept: they name this domain's snapshots (--remove-serials drops "
              "the ones hyperback added)")
    return 0


@dataclass(frozen=True)
class AgentView:
    """What the agent's operator API says of one domain."""

    guest: str                     # the agent's channel: connected, connecting, disconnected, ...
    last_backup_at: float
    schedules: tuple[str, ...]
    next_backup_at: float


def agent_domains(listen: str, timeout: float = 5.0, tls: TlsConfig = NO_TLS) -> dict[str, AgentView] | None:
    """The agent's domains by UUID, from its operator API; None if the agent does not answer."""
    with channel(listen, tls) as chan:
        stub = pb_grpc.OperatorStub(chan)
        try:
            answer = stub.ListDomains(pb.ListDomainsRequest(include_without_channel=True), timeout=timeout)
        except grpc.RpcError:
            return None
    return {d.uuid: AgentView(pb.ChannelState.Name(d.channel_state).removeprefix("CHANNEL_STATE_").lower(),
                              d.last_backup_at, tuple(d.schedules), d.next_backup_at) for d in answer.domains}


def _when(at: float) -> str:
    if not at:
        return "never"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_doc(w: wiring.Wiring, agent: dict[str, AgentView] | None) -> dict[str, Any]:
    doc = w.to_json()
    view = agent.get(w.uuid) if agent is not None else None
    doc["agent"] = ("not running" if agent is None else "not serving this domain" if view is None
                    else "serving")
    if view is not None:
        doc.update(agent_guest=view.guest, last_backup_at=view.last_backup_at or None,
                   schedules=list(view.schedules), next_backup_at=view.next_backup_at or None)
    return doc


def _status_lines(doc: dict[str, Any]) -> list[str]:
    state = "running" if doc["running"] else "shut off"
    kind = "" if doc["persistent"] else ", transient"
    lines = [f"{doc['domain']} ({doc['uuid']}): {state}{kind}"]
    channel = "present" if doc["channel"] else "absent (hyperback vm enable adds it)"
    if doc["running"]:
        live = (f"live, guest side {doc['channel_state'] or 'unknown'}" if doc["channel_live"]
                else "not live yet")
        channel += f", {live}"
    lines.append(f"  channel: {channel}")
    for disk in doc["disks"]:
        if disk["skipped"]:
            lines.append(f"  disk {disk['dev']}: skipped, {disk['skipped']}")
            continue
        if disk["problem"]:
            lines.append(f"  disk {disk['dev']}: cannot be backed up, {disk['problem']}")
            continue
        serial = f"serial {disk['serial']}" if disk["serial"] else "no serial (hyperback vm enable adds one)"
        by = " (added by hyperback)" if disk["added"] else ""
        live = doc["live_serials"].get(disk["dev"], "") if doc["running"] else disk["serial"]
        pending = (f"; the guest sees {live or 'none'} until the next restart" if live != disk["serial"]
                   else "")
        lines.append(f"  disk {disk['dev']}: {serial}{by}, {disk['format']} {disk['source']}{pending}")
    agent = doc["agent"]
    if agent != "serving":
        lines.append(f"  agent: {agent}")
    else:
        guest = f"guest {doc['agent_guest']}" if doc["running"] else "backs it up offline while shut off"
        lines.append(f"  agent: {guest}; last backup {_when(doc['last_backup_at'] or 0)}")
        schedules = ", ".join(doc["schedules"]) or "none"
        lines.append(f"  schedules: {schedules}; next backup {_when(doc['next_backup_at'] or 0)}")
    return lines


def run_status(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    with _connection(args) as conn:
        wired = wiring.status(conn, [args.domain] if args.domain else None)
    agent = agent_domains(settings.operator_listen, tls=settings.tls)
    docs = [_status_doc(w, agent) for w in wired]
    if args.json:
        print(json.dumps(docs))
        return 0
    if not docs:
        print("no domains on this host")
    for doc in docs:
        print("\n".join(_status_lines(doc)))
    return 0
