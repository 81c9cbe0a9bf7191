"""Planning: the options (``OffloadConfig``), which layers go where and in which mode (``plan``,
``budget``, ``footprint``, ``policies``), the model's architecture, the plugin registries, and the
layer-skipping plan. It imports only the core and the shared errors."""
