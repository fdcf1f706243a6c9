"""lesionml: skin-lesion classification on HAM10000, as a library with no orchestration inside.

`tasks/` wraps these functions as Prefect tasks and `flows/` chains them; nothing here
imports either, so every function can be used and tested on its own.

TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or
AMX. On AVX2-only CPUs the Eigen kernels it falls back to train the CNN far more slowly
(docs/benchmarks.md, bench/onednn.py), so oneDNN is asked for here, before anything
imports TensorFlow; a TF_ENABLE_ONEDNN_OPTS already set wins.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
