"""The PySide6 desktop app. Imports the engine and the planner; nothing imports it."""
