"""Shared run machinery for the experiments: seeding, devices, logging, records, data, caches."""
