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
    from flashdesk.engine import _kernels, kernels

    features = _kernels.cpu_features()
    report: dict = {
        "version": __version__,
        "cpu_features": features,
        "kernel_variants": kernels.variant_timings(),
        "kernel_variant_measured": kernels.measured_isa(),
        "kernel_variant_active": kernels.active_isa(),
    }
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
    active, measured = report["kernel_variant_active"], report["kernel_variant_measured"]
    print(
        "kernel variants, in-cache decode on 1 core (GB/s of weights): FP4 experts with bf16 / "
        "fp32 / int8 input, FP8 linears with bf16"
    )
    for isa, figures in report["kernel_variants"].items():
        mark = "  <- fastest" if isa == measured else ""
        int8 = f"{figures['int8_gbps']:6.1f}" if "int8_gbps" in figures else "     -"
        print(
            f"  {isa:<12} {figures['bf16_gbps']:6.1f} / {figures['fp32_gbps']:6.1f} / {int8}, "
            f"{figures['fp8_gbps']:6.1f}{mark}"
        )
    if kernels.int8_experts(active):
        print("routed experts on the CPU: int8 activations (faster here; FLASHDESK_INT8=0: bf16)")
    if active != measured:
        print(f"kernel variant in use: {active} (forced by FLASHDESK_ISA)")
    else:
        print(f"kernel variant in use: {active} (measured fastest)")
    if "read_bandwidth" in report:
        bw = report["read_bandwidth"]
        print(
            f"RAM read bandwidth: {bw['best_gbps']:.1f} GB/s best, {bw['mean_gbps']:.1f} GB/s mean "
            f"({bw['threads']} threads, {bw['nbytes'] >> 20} MiB, {bw['passes']} passes)"
        )
    return 0
