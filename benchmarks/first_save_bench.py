"""The first save of a process against the later ones: time blocked, time to durable, memory.

Usage:
    python benchmarks/first_save_bench.py [--sizes 10 50] [--saves 4]
        [--json benchmarks/results/first_save_bench.json]

Every case (size x `.weights.h5` / `.keras` x sync / `async_write`) is a
fresh process, so its first save is a process's first. One fit of `--saves`
epochs of `--steps-between` steps saves at every epoch end; with
`async_write` the next steps run while the write is in flight (TensorFlow then copies the variables
the step writes while the snapshot holds them). Per save: the time
`ModelCheckpoint` blocked the training thread, and the peak RSS from the save
to the next one (its step included) above the RSS before it (`VmHWM`, reset
through `/proc/self/clear_refs`) and the RSS it left behind (at the window's
end above its start); for the last, its commit's time; and the RSS after the
fit above the RSS before the first save (what the saves kept). Each
process also times Keras's `model.save_weights` twice (not durable), the
anchor of the async target. The state is weights plus Adam's
two slots. `os.sync()` before each process; every save's raw values go to
the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench_common import reset_peak, status  # (benchmarks/ is this script's directory)


def case(millions: float, ext: str, asynchronous: bool, saves: int, directory: str,
         steps: int = 1) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    from save_bench import build  # (benchmarks/ is this script's directory)

    import keras_ckpt

    model = build(millions)  # save_bench's Dense stack, trained one step: the optimizer built
    # One batch (32 rows) for each step of an epoch: fewer rows would end each epoch
    # early ("ran out of data"), with fewer steps between the saves than asked for.
    x = np.zeros((max(2, steps) * 32, model.input_shape[-1]), "float32")
    state = sum(v.numpy().nbytes for v in model.variables + model.optimizer.variables)
    rows: list[dict] = []

    class Measure(keras.callbacks.Callback):
        """At each epoch end, before the checkpoint's save: closes the last window, opens one."""

        def close(self):
            if rows and "peak_extra_bytes" not in rows[-1]:
                rows[-1]["peak_extra_bytes"] = status("VmHWM") - self.rss
                rows[-1]["peak_extra_over_state"] = rows[-1]["peak_extra_bytes"] / state
                # What the window left behind: the RSS at its end above the RSS at its start.
                rows[-1]["rss_growth_over_state"] = (status("VmRSS") - self.rss) / state

        def on_epoch_end(self, epoch, logs=None):
            self.close()
            self.rss, self.started = status("VmRSS"), time.perf_counter()
            if not rows:
                self.first_rss = self.rss
            reset_peak()

    class After(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the checkpoint's save
            rows.append({"blocked_s": time.perf_counter() - measure.started})

    measure = Measure()
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(directory, "c-{epoch}" + ext), save_weights_only=ext == ".weights.h5",
        async_write=asynchronous)
    # `steps` steps an epoch: with async_write they run while the write is in flight.
    model.fit(x, x, epochs=saves, steps_per_epoch=steps, verbose=0,
              callbacks=[measure, checkpoint, After()])
    measure.close()  # (the last window ends after fit waited for the last write)
    kept = (status("VmRSS") - measure.first_rss) / state  # above the RSS before the first save
    rows[-1]["last_commit_s"] = checkpoint.last_save_seconds
    keras_times = []
    for _ in range(2):
        started = time.perf_counter()
        model.save_weights(os.path.join(directory, "keras.weights.h5"))
        keras_times.append(time.perf_counter() - started)
    return {"millions": millions, "ext": ext, "async": asynchronous, "steps_between": steps,
            "state_bytes": state, "kept_after_fit_over_state": kept,
            "saves": rows, "keras_save_weights_s": keras_times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[10, 50])
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--steps-between", type=int, default=1,
                   help="training steps between two saves (epochs of that many steps)")
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument("--case", nargs=4, metavar=("MILLIONS", "EXT", "ASYNC", "DIR"))
    p.add_argument("--json", default="benchmarks/results/first_save_bench.json")
    args = p.parse_args()
    if args.case:
        millions, ext, asynchronous, directory = args.case
        print(json.dumps(case(float(millions), ext, asynchronous == "1", args.saves, directory,
                              args.steps_between)))
        return
    results = []
    for millions in args.sizes:
        for ext in (".weights.h5", ".keras"):
            for asynchronous in [str(int(m == "async")) for m in args.modes]:
                directory = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
                try:
                    os.sync()
                    out = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--saves", str(args.saves),
                         "--steps-between", str(args.steps_between),
                         "--case", str(millions), ext, asynchronous, directory],
                        check=True, capture_output=True, text=True).stdout
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                result = json.loads(out.strip().splitlines()[-1])
                results.append(result)
                saves = result["saves"]
                print(f"{millions}M {ext} {'async' if asynchronous == '1' else 'sync'}: "
                      + "; ".join(f"blocked {r['blocked_s'] * 1000:.0f} ms, peak "
                                  f"+{r['peak_extra_over_state']:.2f}x, left "
                                  f"{r['rss_growth_over_state']:+.2f}x" for r in saves)
                      + f"; save_weights {min(result['keras_save_weights_s']) * 1000:.0f} ms"
                      + f"; kept after fit +{result['kept_after_fit_over_state']:.2f}x",
                      flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"cases": results}, f, indent=2)


if __name__ == "__main__":
    main()
