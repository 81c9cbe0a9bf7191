"""The engine's core: flat layer buffers and their layout, device memory, the per-layer unit, the
movers that bring layers to the device (session buffers, stream rings), the hooks that run them, and
the storage tiers. It imports nothing from planning, integrations or tools."""
