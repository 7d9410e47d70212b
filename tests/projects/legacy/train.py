"""Train a small model with a custom layer and save it: `python train.py OUT`.

OUT ending in .h5 or .keras is saved with model.save; any other name is a SavedModel folder
(model.save under Keras 2, model.export under Keras 3, which saves no Keras config). Writes
OUT.input.npy (40 probe rows) and OUT.reference.npy (model.predict of them, Keras' defaults)
beside it: the bits a rebuilt environment must give again.
"""

import sys

import legacylayers
import numpy as np
import tensorflow as tf

out = sys.argv[1].rstrip("/")
keras = tf.keras
# Not keras.utils.set_random_seed: under it tf_keras (2.16, 2.17) calls random.randint(1, 1e9),
# which Python 3.12 refuses. The bits to reproduce are those of the saved model anyway.
tf.random.set_seed(0)
inp = keras.Input((4,), name="features")
x = legacylayers.Scale(name="scale")(inp)
x = keras.layers.Dense(8, activation="tanh", name="hidden")(x)
y = keras.layers.Dense(2, name="logits")(x)
model = keras.Model(inp, y)
model.compile(optimizer="adam", loss="mse")
rng = np.random.default_rng(0)
X = rng.standard_normal((64, 4)).astype("float32")
model.fit(X, X[:, :2] * 3.0, epochs=2, verbose=0)
keras_major = int(str(getattr(keras, "__version__", "2")).split(".")[0])
if out.endswith((".h5", ".keras")) or keras_major < 3:
    model.save(out)
else:
    model.export(out)
probe = rng.standard_normal((40, 4)).astype("float32")
np.save(out + ".input.npy", probe)
np.save(out + ".reference.npy", model.predict(probe, verbose=0))
