"""Storage: the repository on backup media and the native data path that fills it.

``repository`` is the API the rest of hyperback calls (backup, restore, snapshots, verify,
check); ``copier`` is the only module that touches the native library; ``maptree``, ``extents``,
``qcow2``, ``packfile``, ``locks``, ``gc``, ``retention``, ``annotations`` (labels, notes,
protection), ``selection`` (list filters) and ``repair`` (indexes rebuilt from packs) are its
parts. The format is specified in ``docs/repository-format.md``. Nothing here knows of VMs,
guests, plans or the network.
"""
