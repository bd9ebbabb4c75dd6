"""A checkpoint directory at a URL: a local mirror, uploads, resume on a fresh machine.

TensorFlow's in-memory `ram://` file system stands in for gs:// or s3:// (the
same tf.io.gfile calls); it lives as long as this test process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile

import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import remote, storage

tf = importlib.import_module("tensorflow") if importlib.util.find_spec("tensorflow") else None
pytestmark = pytest.mark.skipif(tf is None or keras.backend.backend() != "tensorflow",
                                reason="ram:// is TensorFlow's file system")


def fit(model, callbacks, epochs):
    x, y = make_data(64, seed=2)
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


def remote_names(url):
    return sorted(tf.io.gfile.listdir(url)) if tf.io.gfile.exists(url) else []


def test_a_url_directory_is_uploaded_pruned_and_resumed_on_a_fresh_machine(tmp_path):
    url = f"ram://{tmp_path.name}/run"
    straight = make_model(dropout=0.2)
    fit(straight, [], epochs=3)

    def checkpoint(**kwargs):
        return keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", resume=True,
                                          retention=[keras_ckpt.KeepLast(2)], **kwargs)

    first = checkpoint(async_write=True)  # uploads from the background writer
    assert first.get_config()["filepath"] == f"{url}/c-{{epoch}}.keras"
    assert first.directory != url and not remote.is_remote(first.directory)
    fit(make_model(dropout=0.2), [first], epochs=2)
    assert remote_names(url) == ["c-1.keras", "c-2.keras"]
    shutil.rmtree(first.directory)  # a fresh machine: nothing local

    second = checkpoint()
    model = make_model(dropout=0.2)
    fit(model, [second], epochs=3)
    assert (second.resumed_from.epoch, second.resumed_from.global_step) == (1, 8)
    assert remote_names(url) == ["c-2.keras", "c-3.keras"]  # KeepLast(2), remotely too
    for a, b in zip(straight.variables, model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # What was uploaded is a complete checkpoint Keras loads.
    local = tmp_path / "copy.keras"
    tf.io.gfile.copy(f"{url}/c-3.keras", str(local))
    loaded = keras.saving.load_model(local)
    np.testing.assert_array_equal(loaded.variables[0].numpy(), model.variables[0].numpy())


def test_a_fresh_machine_downloads_newest_first_only_until_one_verifies(tmp_path):
    url = f"ram://{tmp_path.name}/run"

    def checkpoint():
        return keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", resume=True,
                                          retention=[keras_ckpt.KeepLast(3)])

    first = checkpoint()
    fit(make_model(), [first], epochs=4)
    assert remote_names(url) == ["c-2.keras", "c-3.keras", "c-4.keras"]
    shutil.rmtree(first.directory)  # a fresh machine
    with tf.io.gfile.GFile(f"{url}/c-4.keras", "rb") as f:  # the newest, damaged remotely
        damaged = bytearray(f.read())
    damaged[len(damaged) // 2] ^= 0xFF
    tf.io.gfile.remove(f"{url}/c-4.keras")  # (ram:// "wb" appends to an existing file)
    with tf.io.gfile.GFile(f"{url}/c-4.keras", "wb") as f:
        f.write(bytes(damaged))
    downloaded = []

    class Local(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            downloaded.extend(sorted(n for n in os.listdir(second.directory) if n[0] != "."))

    second = checkpoint()
    with pytest.warns(UserWarning, match="c-4.keras"):
        fit(make_model(), [second, Local()], epochs=5)
    assert second.resumed_from.epoch == 2  # c-3: the newest that verifies
    assert downloaded == ["c-3.keras", "c-4.keras"]  # c-2 never came down
    # KeepLast(3) over what the bucket holds, c-2 included: it is deleted there.
    assert remote_names(url) == ["c-3.keras", "c-4.keras", "c-5.keras"]


class FailingRename:
    """A mirror's store, except that renames fail (a store that refuses the write)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    @staticmethod
    def rename(*args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, "write access denied")


def test_a_failed_upload_follows_on_save_error_and_leaves_nothing_partial(tmp_path):
    url = f"ram://{tmp_path.name}/run"
    warned = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras")
    warned._mirror._store = FailingRename(warned._mirror._store)
    with pytest.warns(UserWarning, match="Uploading to .*c-1.keras failed.*denied"):
        fit(make_model(), [warned], epochs=1)
    assert remote_names(url) == []  # no checkpoint, no temporary left behind
    assert len(warned.save_errors) == 1

    raised = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", on_save_error="raise")
    raised._mirror._store = FailingRename(raised._mirror._store)
    with pytest.raises(OSError, match="Uploading to"):
        fit(make_model(), [raised], epochs=1)


def test_bad_urls_fail_at_construction():
    with pytest.raises(ValueError, match="no file system for nosuchfs:// is installed.*s3fs"):
        keras_ckpt.ModelCheckpoint("nosuchfs://bucket/c-{epoch}.keras")
    with pytest.raises(ValueError, match="placeholders may only be in the file name"):
        keras_ckpt.ModelCheckpoint("ram://bucket/{epoch}/c.keras")


def test_a_fixed_name_rewritten_by_another_machine_is_pulled_again(tmp_path, monkeypatch):
    """Two machines share one URL; each has its own local disk (its own temporary directory)."""
    url = f"ram://{tmp_path.name}/run"
    path = f"{url}/state.keras"  # a fixed name: every save rewrites it

    def on_machine(name, **kwargs):
        (tmp_path / name).mkdir(exist_ok=True)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / name))
        return keras_ckpt.ModelCheckpoint(path, **kwargs)

    def names(name):
        return name == "state.keras"

    def fit_epoch(model, checkpoint, epoch):
        x, y = make_data(64, seed=2)
        model.fit(x, y, batch_size=16, initial_epoch=epoch - 1, epochs=epoch, verbose=0,
                  shuffle=False, callbacks=[checkpoint])

    straight = make_model(dropout=0.2)
    fit(straight, [], epochs=3)
    training = make_model(dropout=0.2)
    on_a = on_machine("a")
    fit_epoch(training, on_a, 1)  # machine A writes epoch 1, then is gone
    stale = os.path.join(on_a.directory, "state.keras")
    on_b = on_machine("b")
    fit_epoch(training, on_b, 2)  # machine B writes epoch 2 under the same name
    # A's copy is stale; make it the very same size (zero bytes after a zip's end are
    # ignored by every reader): only its content differs.
    assert storage.read_meta(stale)["progress"]["global_step"] == 4
    remote_size = tf.io.gfile.stat(path).length
    if os.path.getsize(stale) < remote_size:
        with open(stale, "ab") as f:
            f.write(bytes(remote_size - os.path.getsize(stale)))
    elif os.path.getsize(stale) > remote_size:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        tf.io.gfile.remove(path)  # TF's ram:// appends to an existing file opened "wb"
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(data + bytes(os.path.getsize(stale) - remote_size))
    assert os.path.getsize(stale) == tf.io.gfile.stat(path).length
    assert storage.read_meta(stale)["progress"]["global_step"] == 4

    model = make_model(dropout=0.2)
    back = on_machine("a", resume=True)
    fit(model, [back], epochs=3)  # A again: resumes from B's epoch 2, not its stale epoch 1
    assert (back.resumed_from.epoch, back.resumed_from.global_step) == (1, 8)
    for a, b in zip(straight.variables, model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    # An identical remote file is never downloaded again; a changed one always is.
    mirror = remote.Mirror(url, local=str(tmp_path / "c"))
    assert mirror.pull(names) == ["state.keras"]
    assert mirror.same("state.keras") and mirror.pull(names) == []
    fit_epoch(training, on_machine("b"), 3)
    assert not mirror.same("state.keras")
    assert mirror.pull(names) == ["state.keras"]
    assert storage.read_meta(os.path.join(mirror.local, "state.keras"))["progress"][
        "global_step"] == 12
