"""Classes the zoo's models are built from, registered so that a saved file names them.

Written against the `keras` package, so the same file serves Keras 2 (TensorFlow 2.15, where
`import keras` is Keras 2.15) and Keras 3. Adapted from public keras-io examples:
`Sampling` from examples/generative/vae.py, `MLPClassifier` in the style of the subclassing
guide (guides/making_new_layers_and_models_via_subclassing.py).
"""

import keras

register = keras.saving.register_keras_serializable if hasattr(keras, "saving") \
    else keras.utils.register_keras_serializable
KERAS3 = int(keras.__version__.split(".")[0]) >= 3


@register(package="zoo")
class Sampling(keras.layers.Layer):
    """Uses (z_mean, z_log_var) to sample z: random at inference, on purpose (a VAE)."""

    def __init__(self, seed=1337, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        if KERAS3:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        if KERAS3:
            eps = keras.random.normal(keras.ops.shape(z_mean), seed=self.seed_generator)
            return z_mean + keras.ops.exp(0.5 * z_log_var) * eps
        import tensorflow as tf
        eps = tf.random.normal(tf.shape(z_mean))
        return z_mean + tf.exp(0.5 * z_log_var) * eps

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@register(package="zoo")
class MLPClassifier(keras.Model):
    """A subclassed model: no functional graph, so nothing in the file says its inputs."""

    def __init__(self, hidden=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.classes = classes
        self.dense1 = keras.layers.Dense(hidden, activation="relu")
        self.dropout = keras.layers.Dropout(0.3)
        self.dense2 = keras.layers.Dense(hidden, activation="relu")
        self.head = keras.layers.Dense(classes, activation="softmax")

    def call(self, x, training=False):
        x = self.dense1(x)
        x = self.dropout(x, training=training)
        return self.head(self.dense2(x))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "classes": self.classes}
