"""What both zoo builds write for a model (numpy only: runs under Keras 2 and Keras 3)."""

import numpy as np


def save_input(name, x):
    """The rows `envlock run` gets: NAME.input.npz for several named inputs, else NAME.input.npy."""
    if isinstance(x, dict):
        np.savez(name + ".input.npz", **x)
        return name + ".input.npz"
    np.save(name + ".input.npy", x)
    return name + ".input.npy"


def outputs_of(pred):
    """Outputs "0".."n-1" in the order envlock writes them (a dict's: sorted by name)."""
    if isinstance(pred, dict):
        pred = [pred[k] for k in sorted(pred)]
    return {str(i): np.asarray(p) for i, p in enumerate(pred if isinstance(pred, list) else [pred])}
