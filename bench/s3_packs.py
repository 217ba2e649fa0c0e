#!/usr/bin/env python3
"""Objects, requests and throughput per GiB stored on the lab's RGW, by pack size (run by hand, as root).

Starts the lab's Ceph cluster (host_agent/lab/ceph.py), or uses one given by HYPERBACK_S3_ENDPOINT,
_ACCESS_KEY and _SECRET_KEY, and stores --gib GiB as packs of each --pack-mib size the way section 11
of docs/repository-format.md lays them out: per pack one PUT of the pack and one of its index (52 bytes
per 32 KiB chunk), then reads every pack back whole and reads 256 random 32 KiB blobs by range.

    .venv/bin/python bench/s3_packs.py --gib 1 --pack-mib 8,16,64
"""
from __future__ import annotations

import argparse
import os
import random
import time
import uuid

import boto3  # type: ignore[import-untyped]

from host_agent.lab.ceph import CephLab, S3Endpoint
from host_agent.storage.objectstore import S3Location, S3Store

CHUNK = 32 * 1024
INDEX_ENTRY = 52
RANGED_READS = 256


def bench_one(s3: S3Endpoint, gib: float, pack_mib: int) -> dict[str, float]:
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key,
                 aws_secret_access_key=s3.secret_key).create_bucket(Bucket=bucket)
    store = S3Store(S3Location(s3.endpoint, bucket, "repo/", s3.access_key, s3.secret_key))
    pack_size = pack_mib * 1024 * 1024
    packs = max(1, round(gib * 1024 / pack_mib))
    body = os.urandom(pack_size)  # incompressible, as packs of compressed chunks are
    index = os.urandom(pack_size // CHUNK * INDEX_ENTRY)
    names = [uuid.uuid4().hex for _ in range(packs)]
    start = time.perf_counter()
    for name in names:
        store.put(f"packs/{name[:2]}/{name}", body)
        store.put(f"index/{name}", index)
    put_s = time.perf_counter() - start
    put_requests = store.requests
    start = time.perf_counter()
    for name in names:
        store.get(f"packs/{name[:2]}/{name}")
    get_s = time.perf_counter() - start
    rng = random.Random(1)
    start = time.perf_counter()
    for _ in range(RANGED_READS):
        name = rng.choice(names)
        store.get_range(f"packs/{name[:2]}/{name}", rng.randrange(pack_size // CHUNK) * CHUNK, CHUNK)
    ranged_s = time.perf_counter() - start
    stored_gib = packs * pack_size / 1024**3
    objects = sum(1 for _ in store.list())
    return {"pack_mib": pack_mib, "packs": packs, "objects_per_gib": objects / stored_gib,
            "put_requests_per_gib": put_requests / stored_gib,
            "put_mib_s": packs * pack_size / 2**20 / put_s, "get_mib_s": packs * pack_size / 2**20 / get_s,
            "ranged_ms": ranged_s / RANGED_READS * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--pack-mib", default="8,16,64", help="comma-separated pack sizes in MiB")
    args = parser.parse_args()
    given = os.environ.get("HYPERBACK_S3_ENDPOINT")
    lab = None
    if given:
        s3 = S3Endpoint(given, os.environ["HYPERBACK_S3_ACCESS_KEY"], os.environ["HYPERBACK_S3_SECRET_KEY"])
    else:
        lab = CephLab()
        s3 = lab.start()
    try:
        print("pack MiB  packs  objects/GiB  PUTs/GiB  PUT MiB/s  GET MiB/s  32 KiB ranged GET ms")
        for size in (int(x) for x in args.pack_mib.split(",")):
            r = bench_one(s3, args.gib, size)
            print(f"{r['pack_mib']:8.0f}  {r['packs']:5.0f}  {r['objects_per_gib']:11.1f}  "
                  f"{r['put_requests_per_gib']:8.1f}  {r['put_mib_s']:9.1f}  {r['get_mib_s']:9.1f}  "
                  f"{r['ranged_ms']:20.2f}", flush=True)
    finally:
        if lab is not None:
            lab.stop()


if __name__ == "__main__":
    main()
