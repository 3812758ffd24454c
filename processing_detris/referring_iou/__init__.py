"""`evaluate` metric module folder: load it with `evaluate.load(<path to this folder>)`."""

import os


REFERRING_IOU_METRIC_PATH = os.path.dirname(os.path.abspath(__file__))
