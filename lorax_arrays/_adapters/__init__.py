"""Adapters: the kinds (`kinds`), targeting rules, `Adapter`, `AdapterStack`,
`init_adapter`, the served contract (`ServedAdapters`) and `loraify`/`merge`."""
