"""A checkpoint directory at a URL: a local mirror, uploads, resume on a fresh machine.

TensorFlow's in-memory `ram://` file system stands in for gs:// or s3:// (the
same tf.io.gfile calls); it lives as long as this test process.
"""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import remote

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
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


class FailingRename:
    """tf.io.gfile, except that renames fail (a store that refuses the write)."""

    def __getattr__(self, name):
        return getattr(tf.io.gfile, name)

    @staticmethod
    def rename(*args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, "write access denied")


def test_a_failed_upload_follows_on_save_error_and_leaves_nothing_partial(tmp_path):
    url = f"ram://{tmp_path.name}/run"
    warned = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras")
    warned._mirror._gfile = FailingRename()
    with pytest.warns(UserWarning, match="Uploading to .*c-1.keras failed.*denied"):
        fit(make_model(), [warned], epochs=1)
    assert remote_names(url) == []  # no checkpoint, no temporary left behind
    assert len(warned.save_errors) == 1

    raised = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", on_save_error="raise")
    raised._mirror._gfile = FailingRename()
    with pytest.raises(OSError, match="Uploading to"):
        fit(make_model(), [raised], epochs=1)


def test_bad_urls_fail_at_construction():
    with pytest.raises(ValueError, match="no file system for this URL.*tf.io.gfile knows.*ram://"):
        keras_ckpt.ModelCheckpoint("nosuchfs://bucket/c-{epoch}.keras")
    with pytest.raises(ValueError, match="placeholders may only be in the file name"):
        keras_ckpt.ModelCheckpoint("ram://bucket/{epoch}/c.keras")
