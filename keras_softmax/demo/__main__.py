"""`python -m keras_softmax.demo`: the main job (see `keras_softmax.demo.digits`)."""

import sys

from keras_softmax.demo.digits import main

sys.exit(main())
