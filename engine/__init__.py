"""The V4 model and its runtime. No Qt here: the engine is usable from a plain script.

`from flashdesk.engine import load_model` is resolved lazily so importing the package stays free
of torch.
"""


def __getattr__(name: str):
    if name == "load_model":
        from flashdesk.engine.model.loader import load_model

        return load_model
    raise AttributeError(f"module 'flashdesk.engine' has no attribute {name!r}")
