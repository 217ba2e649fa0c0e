"""Mutual TLS for hyperback's network APIs (docs/tls.md): certificates and the identity in them
(``certs``, ``identity``), credentials for servers and clients (``transport``), and the per-method
role check servers apply (``roles``)."""
