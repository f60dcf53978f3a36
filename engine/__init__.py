"""The V4 model and its runtime. No Qt here: the engine is usable from a plain script."""
