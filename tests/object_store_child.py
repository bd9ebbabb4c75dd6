"""A training script with its checkpoints at a URL (tests/test_object_store.py), maybe killed.

Usage: python tests/object_store_child.py URL OUT.npz [--kill-epoch K]

Trains `tiny.make_model(dropout=0.2)` for 3 epochs with
`ModelCheckpoint(URL/c-{epoch}.keras, resume=True, retention=[KeepLast(2)])`;
`--kill-epoch K` SIGKILLs the process as epoch K (0-based) begins. A run that
ends writes its variables and where it resumed from to OUT.npz. The local
mirror lives under $TMPDIR: a new TMPDIR is a fresh machine.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from conftest import make_data  # noqa: E402
from tiny import make_model  # noqa: E402

import keras_ckpt  # noqa: E402


class Kill(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    url, out = argv[:2]
    kill = int(argv[argv.index("--kill-epoch") + 1]) if "--kill-epoch" in argv else None
    x, y = make_data(64, seed=2)
    model = make_model(dropout=0.2)
    checkpoint = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", resume=True,
                                            retention=[keras_ckpt.KeepLast(2)])
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
              callbacks=[checkpoint] + ([Kill(kill)] if kill is not None else []))
    resumed = checkpoint.resumed_from
    np.savez(out, resumed_epoch=-1 if resumed is None else resumed.epoch,
             **{f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
