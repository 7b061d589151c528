"""Where one lm_compare side's time goes: the side in a process of its own under cProfile (host time by
function), with the GPU's utilisation sampled every 250 ms beside it (host-bound or device-bound).

    python bench/profile_sides.py OUT_DIR kubetrain,hf-grouped [lm_compare args ...]
"""

from __future__ import annotations

import io
import pstats
import subprocess
import sys
from pathlib import Path

LM_COMPARE = Path(__file__).with_name("lm_compare.py")


def main() -> None:
    out, sides, rest = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    for side in sides:
        with open(out / f"{side}.util.csv", "w") as util:
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=util)
            profile = out / f"{side}.prof"
            try:  # the side in a process of its own, as lm_compare runs it, under cProfile
                subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), str(LM_COMPARE), "--side", side,
                                *rest], check=True)
            finally:
                smi.terminate()
        text = io.StringIO()
        stats = pstats.Stats(str(profile), stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        (out / f"{side}.profile.txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
