# Profiles optimizer steps PROF_FROM..PROF_FROM+2 of a train_ds.py process when PROF_OUT (a folder) is set.
import os
if os.environ.get("PROF_OUT") and "train_ds" in " ".join(__import__("sys").argv):
    import sys, time
    import torch
    import transformers.trainer as _t
    _orig = _t.Trainer.training_step
    _state = {"n": 0, "prof": None, "t": None}
    first = int(os.environ.get("PROF_FROM", "8"))
    def training_step(self, *a, **k):
        n = _state["n"] = _state["n"] + 1
        if n == first:
            torch.cuda.is_available() and torch.cuda.synchronize()
            _state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                 torch.profiler.ProfilerActivity.CUDA])
            _state["prof"].__enter__()
            _state["t"] = time.perf_counter()
        out = _orig(self, *a, **k)
        if n == first + 2:
            torch.cuda.is_available() and torch.cuda.synchronize()
            wall = (time.perf_counter() - _state["t"]) / 3
            p = _state["prof"]
            p.__exit__(None, None, None)
            tag = "_".join(x.replace("/", "-") for x in sys.argv[1:] if not x.startswith("-"))[:0] or str(os.getpid())
            args = " ".join(sys.argv)
            path = os.path.join(os.environ["PROF_OUT"], f"prof_{os.getpid()}.txt")
            with open(path, "w") as f:
                f.write(f"argv: {args}\nwall per step (s): {wall:.4f}\n\n")
                ka = p.key_averages()
                f.write(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
                f.write("\n\n")
                f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
            print(f"PROFILE written: {path} wall/step {wall:.4f}", flush=True)
        return out
    _t.Trainer.training_step = training_step
