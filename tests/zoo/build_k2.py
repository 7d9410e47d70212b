"""Build the Keras 2 part of the zoo, in a Python 3.10 + tensorflow-cpu 2.15 environment:
`python build_k2.py`. Same outputs as build_k3.py (NAME.input.*, NAME.reference.npz,
zoo-keras2.json); every model here is saved with Keras and left for `envlock save`.
"""

import json

import numpy as np
import tensorflow as tf
import zoolayers
from tensorflow import keras
from tensorflow.keras import layers
from zoofiles import outputs_of, save_input

tf.random.set_seed(0)
rng = np.random.default_rng(0)
ZOO = []


def record(name, model, x, flags=()):
    inp = save_input(name, x)
    model.save(name)
    np.savez(name + ".reference.npz", **outputs_of(model.predict(x, verbose=0)))
    ZOO.append({"name": name, "input": inp, "save": "cli", "flags": list(flags), "sampling": False,
                "stack": "keras2"})


# 1. A subclassed model (guides/making_new_layers_and_models_via_subclassing.py), trained with Adam
#    and saved as a SavedModel folder (its optimizer slots go into the checkpoint).
sub = zoolayers.MLPClassifier(hidden=16, classes=3)
sub.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
xsub = rng.standard_normal((64, 6)).astype("float32")
sub.fit(xsub, rng.integers(3, size=64), epochs=1, verbose=0)
np.save("k2_subclassed.probe.npy", xsub[:16])
record("k2_subclassed", sub, xsub[:40], flags=["--probe", "k2_subclassed.probe.npy"])

# 2. keras-io examples/structured_data/structured_data_classification_from_scratch.py (the tf.keras
#    version): many named inputs, IntegerLookup and StringLookup (raw strings in), Normalization,
#    compiled with a metric and saved in Keras 2's .keras format.
n = 128
frame = {
    "sex": rng.integers(2, size=(n, 1)), "cp": rng.integers(5, size=(n, 1)),
    "fbs": rng.integers(2, size=(n, 1)), "restecg": rng.integers(3, size=(n, 1)),
    "exang": rng.integers(2, size=(n, 1)), "ca": rng.integers(4, size=(n, 1)),
    "thal": rng.choice(np.array(["fixed", "normal", "reversible"]), size=(n, 1)),
    "age": rng.integers(29, 77, size=(n, 1)).astype("float32"),
    "trestbps": rng.normal(130, 17, size=(n, 1)).astype("float32"),
    "chol": rng.normal(246, 51, size=(n, 1)).astype("float32"),
    "thalach": rng.normal(150, 23, size=(n, 1)).astype("float32"),
    "oldpeak": rng.gamma(1.0, 1.0, size=(n, 1)).astype("float32"),
    "slope": rng.integers(1, 4, size=(n, 1)).astype("float32"),
}
target = rng.integers(2, size=(n, 1)).astype("float32")
all_inputs, encoded = [], []
for name in ("sex", "cp", "fbs", "restecg", "exang", "ca"):
    inp = keras.Input(shape=(1,), name=name, dtype="int64")
    lookup = layers.IntegerLookup(output_mode="binary")
    lookup.adapt(frame[name])
    all_inputs.append(inp)
    encoded.append(lookup(inp))
thal = keras.Input(shape=(1,), name="thal", dtype="string")
thal_lookup = layers.StringLookup(output_mode="binary")
thal_lookup.adapt(frame["thal"])
all_inputs.append(thal)
encoded.append(thal_lookup(thal))
for name in ("age", "trestbps", "chol", "thalach", "oldpeak", "slope"):
    inp = keras.Input(shape=(1,), name=name)
    norm = layers.Normalization()
    norm.adapt(frame[name])
    all_inputs.append(inp)
    encoded.append(norm(inp))
x = layers.Dense(32, activation="relu")(layers.concatenate(encoded))
x = layers.Dropout(0.5)(x)
structured = keras.Model(all_inputs, layers.Dense(1, activation="sigmoid")(x))
structured.compile("adam", "binary_crossentropy", metrics=["accuracy"])
structured.fit(frame, target, epochs=1, verbose=0)
record("k2_structured.keras", structured, {k: v[:40] for k, v in frame.items()})

# 3. Transfer learning (guides/transfer_learning.py): a base model trained with its own optimizer,
#    nested in a new model that is trained again, saved as .h5.
base = keras.Sequential([keras.Input((8,)), layers.Dense(16, activation="relu"),
                         layers.Dense(16, activation="relu")], name="base")
base.compile(optimizer="sgd", loss="mse")
xn = rng.standard_normal((64, 8)).astype("float32")
base.fit(xn, np.zeros((64, 16), "float32"), epochs=1, verbose=0)
nested_in = keras.Input((8,), name="features")
nested = keras.Model(nested_in, layers.Dense(2, name="classes")(base(nested_in)))
nested.compile(optimizer="adam", loss="mse")
nested.fit(xn, xn[:, :2], epochs=1, verbose=0)
record("k2_nested.h5", nested, xn[:40])

# 4. The same nested model as a SavedModel: optimizer slots of both optimizers in the checkpoint.
record("k2_nested_savedmodel", nested, xn[:40])

with open("zoo-keras2.json", "w") as fh:
    json.dump(ZOO, fh, indent=1)
