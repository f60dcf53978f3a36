"""`flashdesk info`: what the compiled kernels see on this machine."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--bandwidth-mib",
        type=int,
        default=512,
        metavar="MIB",
        help="buffer size for the RAM read-bandwidth measurement (default 512; 0 skips it)",
    )


def run(args: argparse.Namespace) -> int:
    from flashdesk import __version__
    from flashdesk.engine import _kernels

    features = _kernels.cpu_features()
    report: dict = {"version": __version__, "cpu_features": features}
    if args.bandwidth_mib > 0:
        report["read_bandwidth"] = _kernels.read_bandwidth(
            args.bandwidth_mib << 20, 0, 0.5, details=True
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    flags = [name for name, on in features.items() if on is True]
    print(f"flashdesk {__version__}")
    print(f"logical cores: {features['logical_cores']}")
    print(f"SIMD: {' '.join(flags) or 'none beyond the baseline'}")
    if "read_bandwidth" in report:
        bw = report["read_bandwidth"]
        print(
            f"RAM read bandwidth: {bw['best_gbps']:.1f} GB/s best, {bw['mean_gbps']:.1f} GB/s mean "
            f"({bw['threads']} threads, {bw['nbytes'] >> 20} MiB, {bw['passes']} passes)"
        )
    return 0
