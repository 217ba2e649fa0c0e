"""Co-location: keeping backup data off the LAN by moving a VM, or its backup appliance.

``footprint`` measures what a move would cost, ``migration`` moves a domain between hosts
safely, ``visits`` carries out a backup on the media host (there and back), ``appliance``
brings a backup appliance VM to the VMs and sends it on, ``serviceip`` keeps a service's
address on whichever host serves it. Specified in ``docs/colocation.md``.
"""
