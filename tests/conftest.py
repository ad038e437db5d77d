import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import simcuda  # noqa: E402

simcuda.register()  # before any test's backward: see simcuda.register
