"""Train a tiny model with a custom layer and save it with envlock's Python API."""

import sys

import keras
import numpy as np
from layers import Scale

import envlock

# Starts envlock's reload worker (a fresh interpreter importing TensorFlow) while we train,
# so that saving below does not wait for it.
envlock.prewarm()

out = sys.argv[1] if len(sys.argv) > 1 else "model.keras"
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((256, 8)).astype("float32")
y = (x @ rng.standard_normal((8, 3))).astype("float32")

inp = keras.Input((8,), name="features")
h = Scale(name="scale")(inp)
h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
model = keras.Model(inp, keras.layers.Dense(3, name="prediction")(h))
model.compile(optimizer="adam", loss="mse")
model.fit(x, y, epochs=5, verbose=0)

# Real data as the probe: the reference predictions are what this model gives on it.
result = envlock.save(model, out, probe=x[:32])
np.save(out + ".input.npy", x)
print(f"saved {out} and its sidecar {result.sidecar}")
