"""How `flashdesk` (no command) chooses its backend, and `flashdesk bench` name handling."""

from __future__ import annotations

import argparse

from flashdesk.app.main import make_backend
from flashdesk.app.settings import Settings


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"test_model": False, "model": None, **kw})


def test_without_weights_the_demo_model_is_offered(tmp_path):
    backend = make_backend(_args(), tmp_path, Settings())
    assert backend.model_path is None and backend.demo  # demo GGUF when installed, else test model


def test_test_model_flag_and_configured_checkpoint(tmp_path):
    backend = make_backend(_args(test_model=True), tmp_path, Settings(model_path="/x"))
    assert backend.model_path is None and not backend.demo
    backend = make_backend(_args(), tmp_path, Settings(model_path=str(tmp_path)))
    assert backend.model_path == tmp_path


def test_bench_accepts_hyphenated_names(capsys):
    from flashdesk import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    code = bench.run(parser.parse_args(["no-such-bench"]))
    assert code == 2 and "no_such_bench" in capsys.readouterr().out
