"""hyperback certs: a cluster's CA, and certificates for its agents, operators and monitors (docs/tls.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from host_agent import errors
from host_agent.tls import certs
from host_agent.tls.identity import Identity, Role, parse_uri


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "certs", help="make the CA and certificates for mutual TLS",
        description="Make a cluster's CA, then a certificate per identity: an agent (named by its "
                    "inventory host name), an operator or a monitor. The identity lives in the "
                    "certificate as the SAN URI hyperback://role/ROLE/host|name/NAME (docs/tls.md). "
                    "Keys are written with mode 0600; keep the CA's key off the hosts.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", parser_class=type(p))
    verbs.required = True
    init = verbs.add_parser("init-ca", help="create a CA (ca.pem, ca.key) in DIR")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--name", default="hyperback CA", help="the CA's common name (default %(default)s)")
    init.add_argument("--days", type=int, default=certs.CA_DAYS, help="validity (default %(default)s)")
    init.set_defaults(run=run_init)
    issue = verbs.add_parser("issue", help="issue a certificate and key signed by the CA in --ca")
    issue.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA's directory")
    issue.add_argument("--role", required=True, choices=[r.value for r in Role])
    issue.add_argument("--name", required=True, metavar="NAME",
                       help="the host name for an agent (as in the inventory), else a person or tool")
    issue.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                       help="where ROLE-NAME.pem and ROLE-NAME.key go (default: here)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="a DNS name clients reach this identity's service by (repeatable)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                       help="an address clients reach this identity's service by (repeatable)")
    issue.add_argument("--days", type=int, default=certs.CERT_DAYS, help="validity (default %(default)s)")
    issue.add_argument("--json", action="store_true", help="print the files and identity as JSON")
    issue.set_defaults(run=run_issue)
    revoke = verbs.add_parser("revoke", help="add certificates to the CA's revocation list (CRL)")
    revoke.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA's directory")
    revoke.add_argument("cert", type=Path, nargs="+", metavar="CERT", help="a certificate (PEM) to revoke")
    revoke.add_argument("--crl", type=Path, metavar="FILE",
                        help=f"the list to write or update (default: {certs.CRL_FILE} in the CA's directory)")
    revoke.set_defaults(run=run_revoke)


def _days(days: int) -> int:
    if days < 1:
        raise errors.UsageError("--days must be at least 1")
    return days


def run_init(args: argparse.Namespace) -> int:
    made = certs.init_ca(args.dir, args.name, _days(args.days))
    print(f"CA created: {made.cert} (give it to every host), {made.key} (keep it secret)")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    identity = Identity(Role(args.role), args.name)
    if parse_uri(identity.uri()) != identity:
        raise errors.UsageError(f"--name {args.name!r}: 1-64 letters, digits, '.', '_' or '-'")
    made = certs.issue(args.ca, identity, args.out, dns=args.dns, ips=args.ip, days=_days(args.days))
    if args.json:
        print(json.dumps({"identity": identity.uri(), "cert": str(made.cert), "key": str(made.key)}))
    else:
        print(f"{identity.uri()}: {made.cert}, {made.key}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    crl, count = args.crl, 0
    for cert in args.cert:
        crl, count = certs.revoke(args.ca, cert, crl)
    print(f"{crl}: {count} certificate(s) revoked; copy it to every host's [tls] crl (reread at once)")
    return 0
