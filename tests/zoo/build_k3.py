"""Build the Keras 3 part of the zoo (this host's TensorFlow): `python build_k3.py`.

Public keras-io example code, trained for an epoch or two on synthetic data, each model saved
the way its example saves it. For every model NAME this writes NAME.input.npy/.npz (the rows
`envlock run` gets), NAME.reference.npz (model.predict of them, outputs "0".."n-1" in the
model's order) and one line in zoo.json. Models marked "api" are saved with envlock.save here,
the others are left for `envlock save` on the command line.
"""

import json
import sys

import keras
import numpy as np
import zoolayers
from keras import layers
from zoofiles import outputs_of, save_input

import envlock

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
ZOO = []


def record(name, model, x, save="cli", flags=(), sampling=False, probe=None):
    """Write the input rows and the reference; save with envlock.save when save == "api"."""
    inp = save_input(name, x)
    if save == "api":
        envlock.save(model, name, probe=probe)
    else:
        model.save(name)
    if getattr(x, "dtype", None) is not None and x.dtype.kind == "U":
        import tensorflow as tf  # Keras 3 takes strings as tensors, not numpy str arrays
        pred = model.predict(tf.constant(x), verbose=0)
    else:
        pred = model.predict(x, verbose=0)
    np.savez(name + ".reference.npz", **outputs_of(pred))
    ZOO.append({"name": name, "input": inp, "save": save, "flags": list(flags),
                "sampling": sampling, "stack": "keras3"})


# 1. keras-io examples/nlp/text_classification_from_scratch.py, "end-to-end model": raw strings in,
#    TextVectorization inside the model, exported to take strings.
words = np.array(["good", "bad", "great", "awful", "movie", "plot", "actor", "boring", "fun", "the"])
texts = np.array([" ".join(rng.choice(words, 12)) for _ in range(256)])
labels = np.array([[t.count("good") + t.count("great") > t.count("bad") + t.count("awful")] for t in texts],
                  dtype="float32")
vectorize = layers.TextVectorization(max_tokens=50, output_mode="int", output_sequence_length=16)
vectorize.adapt(texts)
tokens = keras.Input(shape=(16,), dtype="int64")
x = layers.Embedding(50, 8)(tokens)
x = layers.GlobalAveragePooling1D()(x)
trained = keras.Model(tokens, layers.Dense(1, activation="sigmoid", name="predictions")(x))
trained.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
trained.fit(vectorize(texts), labels, epochs=2, verbose=0)
inputs = keras.Input(shape=(1,), dtype="string", name="text")
text_model = keras.Model(inputs, trained(vectorize(inputs)))
text_model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
record("k3_text.keras", text_model, texts[:40, None])

# 2. Outputs that share a name: one head layer applied to three inputs (Keras 3 names every output
#    after its layer: ['o_net', 'o_net', 'o_net']).
head = layers.Dense(2, name="o_net")
ins = [keras.Input((4,), name=f"view_{i}") for i in range(3)]
shared = keras.Model(ins, [head(t) for t in ins])
shared.compile(optimizer="adam", loss="mse")
xs = {f"view_{i}": rng.standard_normal((64, 4)).astype("float32") for i in range(3)}
shared.fit(xs, [np.zeros((64, 2), "float32")] * 3, epochs=1, verbose=0)
record("k3_shared.keras", shared, {k: v[:40] for k, v in xs.items()})

# 3. keras-io guides/functional_api.py, the ticket model: three named inputs, two named outputs,
#    saved as a legacy .h5 from Keras 3.
num_tags, num_words, num_departments = 12, 100, 4
title_input = keras.Input(shape=(None,), name="title")
body_input = keras.Input(shape=(None,), name="body")
tags_input = keras.Input(shape=(num_tags,), name="tags")
title_features = layers.LSTM(16)(layers.Embedding(num_words, 16)(title_input))
body_features = layers.LSTM(8)(layers.Embedding(num_words, 16)(body_input))
x = layers.concatenate([title_features, body_features, tags_input])
priority_pred = layers.Dense(1, name="priority")(x)
department_pred = layers.Dense(num_departments, name="department")(x)
tickets = keras.Model(inputs=[title_input, body_input, tags_input],
                      outputs={"priority": priority_pred, "department": department_pred})
tickets.compile(optimizer=keras.optimizers.RMSprop(1e-3),
                loss={"priority": keras.losses.BinaryCrossentropy(from_logits=True),
                      "department": keras.losses.CategoricalCrossentropy(from_logits=True)})
t_data = {"title": rng.integers(num_words, size=(64, 10)).astype("float32"),
          "body": rng.integers(num_words, size=(64, 20)).astype("float32"),
          "tags": rng.integers(2, size=(64, num_tags)).astype("float32")}
t_targets = {"priority": rng.random((64, 1)), "department": rng.integers(2, size=(64, num_departments))}
tickets.fit(t_data, t_targets, epochs=1, batch_size=32, verbose=0)
record("k3_tickets.h5", tickets, {k: v[:40] for k, v in t_data.items()})

# 4. A subclassed model (guides/making_new_layers_and_models_via_subclassing.py): the file does
#    not say its inputs, so the probe does.
sub = zoolayers.MLPClassifier(hidden=16, classes=3)
sub.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
xsub = rng.standard_normal((64, 6)).astype("float32")
sub.fit(xsub, rng.integers(3, size=64), epochs=1, verbose=0)
record("k3_subclassed.keras", sub, xsub[:40], save="api", probe=xsub[:16])

# 5. Transfer learning (guides/transfer_learning.py): a base model trained on its own (its optimizer
#    state goes into the file), then nested in a new model that is trained again.
base = keras.Sequential([keras.Input((8,)), layers.Dense(16, activation="relu"),
                         layers.Dense(16, activation="relu")], name="base")
pre = keras.Sequential([base, layers.Dense(1)], name="pretrain")
pre.compile(optimizer="adam", loss="mse")
xn = rng.standard_normal((64, 8)).astype("float32")
pre.fit(xn, xn[:, :1], epochs=1, verbose=0)
base.compile(optimizer="sgd", loss="mse")
base.fit(xn, np.zeros((64, 16), "float32"), epochs=1, verbose=0)
nested_in = keras.Input((8,), name="features")
nested = keras.Model(nested_in, layers.Dense(2, name="classes")(base(nested_in)))
nested.compile(optimizer="adam", loss="mse")
nested.fit(xn, xn[:, :2], epochs=1, verbose=0)
record("k3_nested.keras", nested, xn[:40])

# 6. keras-io examples/generative/vae.py, the encoder: z is sampled at inference.
latent_dim = 2
encoder_inputs = keras.Input(shape=(28, 28, 1), name="image")
x = layers.Conv2D(8, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
x = layers.Flatten()(x)
x = layers.Dense(16, activation="relu")(x)
z_mean = layers.Dense(latent_dim, name="z_mean")(x)
z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
z = zoolayers.Sampling(name="z")([z_mean, z_log_var])
encoder = keras.Model(encoder_inputs, [z_mean, z_log_var, z], name="encoder")
ximg = rng.random((40, 28, 28, 1)).astype("float32")
record("k3_vae_encoder.keras", encoder, ximg, save="api", sampling=True)

with open("zoo-keras3.json", "w") as fh:
    json.dump(ZOO, fh, indent=1)
sys.exit(0)
