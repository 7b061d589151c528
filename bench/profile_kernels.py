"""Where one lm_compare side's GPU time goes: the side in this process under torch.profiler for a few steps
after warm-up (an optimizer-step hook advances the profiler), written as a kernel table and a summary by kind
(matmuls, attention, the loss, the optimizer, the rest) beside the steps' wall time: how much of a step the GPU
is busy, and with what.

    python bench/profile_kernels.py OUT_DIR --side kubetrain --shape 1b [--skip 40 --active 10] [lm_compare args ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule


def sibling(name: str):
    """A bench/ script as a module (they are run as files, not installed)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

KINDS = [("matmul", r"gemm|cutlass|sm90|nvjet|matmul|cublas"), ("attention", r"flash|fmha|attention|sdpa"),
         ("loss", r"cross_entropy|log_softmax|nll"), ("optimizer", r"adam|multi_tensor|foreach"),
         ("copy", r"memcpy|memset|copy")]


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other elementwise/reduction")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--skip", type=int, default=40, help="optimizer steps before profiling (warm-up, compile)")
    p.add_argument("--active", type=int, default=10)
    args, rest = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamps: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=args.skip, warmup=2, active=args.active, repeat=1))

    def advance(*_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        prof.step()

    register_optimizer_step_post_hook(advance)
    with prof:
        row = sibling("lm_compare").main(rest)
    window = stamps[args.skip + 2 + args.active] - stamps[args.skip + 2]  # the active steps' wall time
    # kernels only: an operator's row (aten::mm) carries its kernels' time again, and ProfilerStep the whole step's
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_device_time_total / 1e6
    busy = sum(by_kind.values())
    summary = {"side": row.get("side"), "active_steps": args.active, "wall_s_per_step": window / args.active,
               "gpu_busy_s_per_step": busy / args.active, "gpu_busy_fraction": busy / window,
               "by_kind_s_per_step": {k: v / args.active for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
               "result": row}
    (args.out / "kernels.txt").write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    (args.out / "host.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
