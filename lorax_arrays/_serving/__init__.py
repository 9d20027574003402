"""Serving: the `AdapterBank` (device slots, on-demand loads, issued indices)."""
