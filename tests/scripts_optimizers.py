"""Scenario scripts: optimizers, schedules, accumulation, EMA, clipping, mixed precision."""

from __future__ import annotations

import keras
from scenarios import Script, arrays_fit, dense_model, script

opt = keras.optimizers


def _plain(optimizer) -> Script:
    return Script(dense_model(optimizer), arrays_fit())


@script("sgd-nesterov")
def sgd_nesterov():
    return _plain(opt.SGD(0.05, momentum=0.9, nesterov=True))


@script("adam-exponential-decay")
def adam_exponential_decay():
    return _plain(opt.Adam(opt.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=0.7)))


@script("adamw")
def adamw():
    return _plain(opt.AdamW(0.01, weight_decay=0.05))


@script("rmsprop-centered-momentum")
def rmsprop():
    return _plain(opt.RMSprop(0.005, momentum=0.5, centered=True))


@script("adagrad")
def adagrad():
    return _plain(opt.Adagrad(0.1))


@script("nadam")
def nadam():
    return _plain(opt.Nadam(0.01))


@script("lion")
def lion():
    return _plain(opt.Lion(0.003))


@script("adafactor")
def adafactor():
    return _plain(opt.Adafactor(0.05))


@script("adam-ema")
def adam_ema():
    return _plain(opt.Adam(0.01, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3))


@script("adam-gradient-accumulation")
def adam_accumulation():
    return _plain(opt.Adam(0.01, gradient_accumulation_steps=2))


@script("adam-clipnorm-global")
def adam_clipnorm():
    return _plain(opt.Adam(0.05, global_clipnorm=0.5))


@script("cosine-decay-warmup")
def cosine_decay_warmup():
    schedule = opt.schedules.CosineDecay(0.0, decay_steps=12, warmup_target=0.02, warmup_steps=4)
    return _plain(opt.SGD(schedule, momentum=0.5))


@script("mixed-float16", backends=("tensorflow", "jax"))
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")  # a loss-scaling optimizer
    return _plain(opt.Adam(0.01))


@script("piecewise-constant-sgd")
def piecewise():
    return _plain(opt.SGD(opt.schedules.PiecewiseConstantDecay([5, 9], [0.05, 0.02, 0.005])))
