"""The example's custom layer: lives in a module, as custom objects should."""

import keras


@keras.saving.register_keras_serializable(package="quickstart")
class Scale(keras.layers.Layer):
    """x * w * factor, with a learned per-feature weight w."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
