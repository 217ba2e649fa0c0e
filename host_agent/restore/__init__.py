"""Restoring whole VMs from a repository: their stored definitions rewritten (``vmxml``), their
disks and files materialized and the domain defined (``vm``). See docs/restore.md."""
