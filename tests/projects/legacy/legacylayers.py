"""A custom layer written against tf.keras, as a Keras 2 project would have it.

Registered, so that the saved file names it ("legacy>Scale") and loading needs only the import.
The same code runs under Keras 2 (tf.keras up to TF 2.15, tf_keras with TF_USE_LEGACY_KERAS=1)
and Keras 3 (tf.keras from TF 2.16).
"""

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="legacy")
class Scale(tf.keras.layers.Layer):
    """Multiplies by a learned per-feature weight and a constant factor."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(int(input_shape[-1]),), initializer="random_normal", name="w")
        super().build(input_shape)

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        cfg = super().get_config()
        cfg.update({"factor": self.factor})
        return cfg
