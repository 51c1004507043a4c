"""Tooling around the apps: the ``fedlsc`` CLI, Hydra sweeps, a loopback deployment,
certificates and keys, and per-hospital data folders."""
