"""hyperback's host side: the agent, the optimizer, the media service, the CLI and their wings.

Importing it turns gRPC's fork support off for the process (unless the environment says otherwise),
before anything imports grpc: its fork handlers would run in every child this process forks, and
our children (libguestfs's qemu-img and QEMU, nbdkit, qemu-img) exec at once and never use gRPC.
With the handlers on, a fork while gRPC threads are busy skips gRPC's prefork work ("Other threads
are currently calling into gRPC, skipping fork() handlers") but the child still runs gRPC's handlers
before its exec, and dies of SIGABRT: after tests/test_optimizer.py's in-process servers, every
libguestfs launch in the same process failed ("qemu-img killed by signal 6", then supermin); with
the handlers off, none did.
"""
import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
