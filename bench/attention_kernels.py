"""Attention alone, forward + backward, for the packed and the padded layouts of one batch; needs CUDA.

Why packing did not speed up batch 256 (BENCHMARKS.md): 256 samples of lognormal lengths (median ~40,
cap 128, like hf_compare's corpus), 12 heads of 64, bf16, dropout 0.1, timed over 50 calls each:
- flash varlen on the packed row (what `packing.py` uses);
- cuDNN varlen on the packed row (`aten._cudnn_attention_forward` with cum_seq);
- SDPA on a padded batch of the same samples (width 128, padding mask), and on a length-sorted padded
  batch (all ~50 tokens, width 56), which is what the padded path's length-sorted windows feed.

    python bench/attention_kernels.py
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HEADS, DIM, DROPOUT, SAMPLES, CAP = 12, 64, 0.1, 256, 128


def timed(fn, calls: int = 50) -> str:
    try:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return f"{1e6 * (time.perf_counter() - start) / calls:.1f} us"
    except Exception as err:  # noqa: BLE001 -- a kernel that refuses these inputs is a result too
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def packed(lengths: np.ndarray, kernel: str):
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(int(lengths.sum()), HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def run():
        if kernel == "flash":
            out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, CAP, CAP, DROPOUT, False, False)[0]
        else:
            out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, CAP, CAP, True, DROPOUT, False)[0]
        out.backward(grad)
    return run


def padded(lengths: np.ndarray, width: int):
    q, k, v = (torch.randn(len(lengths), HEADS, width, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = (torch.arange(width, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None])[:, None, None, :]
    grad = torch.randn_like(q)

    def run():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=DROPOUT).backward(grad)
    return run


def main() -> dict:
    if not torch.cuda.is_available():
        sys.exit("attention_kernels needs CUDA")
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(38), 0.75, SAMPLES)) + 2, 3, CAP).astype(int)
    similar = np.full(SAMPLES, 50)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": int(lengths.sum()),
        "flash_varlen_packed": timed(packed(lengths, "flash")),
        "cudnn_varlen_packed": timed(packed(lengths, "cudnn")),
        "sdpa_padded_width_128": timed(padded(lengths, CAP)),
        "sdpa_padded_sorted_width_56": timed(padded(similar, 56)),
        "flash_varlen_packed_same_sorted_samples": timed(packed(similar, "flash")),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
