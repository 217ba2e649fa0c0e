"""hyperback's host side: the agent, the optimizer, the media service, the CLI and their wings.

Importing it turns gRPC's fork support off for the process (unless the environment says otherwise),
before anything imports grpc: its fork handlers would run in every child this process forks, and
our children (libguestfs's qemu-img and QEMU, nbdkit, qemu-img) exec at once and never use gRPC.
With the handlers on, a fork while gRPC threads are busy skips gRPC's prefork work but still runs
child handlers before the exec; CI once saw such a child die of SIGABRT ("qemu-img killed by
signal 6" from libguestfs, after gRPC logged "skipping fork() handlers").
"""
import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
