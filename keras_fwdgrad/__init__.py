"""keras-fwdgrad: train Keras models with forward gradients.

Runs on the TensorFlow (the reference) and JAX backends of Keras. Importing
this package selects TensorFlow when `KERAS_BACKEND` is unset; set
`KERAS_BACKEND=jax` before importing to use JAX.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_fwdgrad import backend
from keras_fwdgrad import directions
from keras_fwdgrad.callbacks import GradientCosine
from keras_fwdgrad.ops import forward_gradient
from keras_fwdgrad.ops import jvp
from keras_fwdgrad.model import ForwardGradientModel

__version__ = "0.1.0"
