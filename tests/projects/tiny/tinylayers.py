"""Custom objects of the test project: one correct layer, one whose weights are not restored."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tiny")
class Scale(keras.layers.Layer):
    """Multiplies by a learned per-feature weight and a constant factor."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="w")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="tiny")
def swish2(x):
    return x * ops.sigmoid(2.0 * x)


@keras.saving.register_keras_serializable(package="tiny")
class ForgetfulDense(keras.layers.Layer):
    """Overrides load_own_variables and forgets to restore: random weights after a reload."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.k = self.add_weight(shape=(input_shape[-1], self.units), initializer="random_normal", name="k")

    def call(self, x):
        return ops.matmul(x, self.k)

    def load_own_variables(self, store):
        pass

    def get_config(self):
        return {**super().get_config(), "units": self.units}
