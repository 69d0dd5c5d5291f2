"""kd: knowledge distillation from a cached teacher.

`kd cache` (kd/cache_teacher.py) runs a teacher once and writes top-k log-probs and hidden states to HDF5 shards
(`kd.cache`); `kd train` (kd/train_student.py) trains a student against that cache. `kd --help` lists every command.
"""

__version__ = "0.1.0"
