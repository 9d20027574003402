"""The core: the `BatchedLoraArray` type, its `Layout` (the axis arithmetic),
index handling, options, errors, tree paths. Imports nothing else from the package;
foreign weight types reach it through `array.register_base_weight`."""
