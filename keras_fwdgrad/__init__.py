"""keras-fwdgrad: train Keras models with forward gradients.

Importing this package selects the TensorFlow backend of Keras when
`KERAS_BACKEND` is unset; forward gradients need TensorFlow's forward-mode
automatic differentiation.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_fwdgrad import directions
from keras_fwdgrad.callbacks import GradientCosine
from keras_fwdgrad.ops import forward_gradient
from keras_fwdgrad.ops import jvp
from keras_fwdgrad.model import ForwardGradientModel

__version__ = "0.1.0"
