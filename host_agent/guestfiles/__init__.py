"""The guest's files, read without trusting them: a guest file system held in a block device (a
snapshot's NBD export, or a point-in-time view) is read inside libguestfs's appliance, a small VM of
its own, and never mounted in the host's kernel.

``reader``  the one module that drives libguestfs: the appliance, its file systems, listings, reads
``extract`` writing what the reader returns into a host directory, never outside it

This wing imports only the ground: it reads an NBD socket, whoever serves it (``docs/restore.md``).
"""
