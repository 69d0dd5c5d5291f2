"""kd: knowledge distillation from a cached teacher.

`cache_teacher.py` runs a teacher once and writes top-k log-probs and hidden states to HDF5 shards
(`kd.cache`); `train_student.py` trains a student against that cache.
"""

__version__ = "0.1.0"
