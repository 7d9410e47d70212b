"""Train a tiny model with custom objects and save it: `python train.py OUT [--forgetful]`."""

import sys

import keras
import numpy as np
import tinylayers

out = sys.argv[1]
keras.utils.set_random_seed(0)
inp = keras.Input((4,), name="features")
x = tinylayers.Scale(name="scale")(inp)
x = keras.layers.Dense(8, activation=tinylayers.swish2, name="hidden")(x)
if "--forgetful" in sys.argv:
    x = tinylayers.ForgetfulDense(3, name="forgetful")(x)
y = keras.layers.Dense(2, name="logits")(x)
model = keras.Model(inp, y)
model.compile(optimizer="adam", loss="mse")
rng = np.random.default_rng(0)
X = rng.standard_normal((64, 4)).astype("float32")
model.fit(X, X[:, :2] * 3.0, epochs=2, verbose=0)
model.save(out)
