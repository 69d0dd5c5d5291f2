"""Text in, packed token windows out: the teacher cache's input side, as a stream.

    sources.py   local files (txt/json/jsonl/csv/parquet, .gz/.zst) and Hugging Face datasets, cut into units;
                 a record read as its text, or (data.format=chat) as a checked conversation
    chat.py      conversations rendered with a chat template, the per-token loss mask (assistant | completion | all)
    pack.py      batched tokenization and on-the-fly packing into seq_len windows; whole conversations packed
                 first-fit, each attending only to itself (ChatPacker, segment_positions)
    ingest.py    the ingest stage: units -> per-document split -> window files on disk, in parallel, resumable

cache_teacher.py runs the ingest, then the teacher pass over the windows it wrote.
"""

from kd.data.pack import MIN_WINDOW_TOKENS, Packer, Windows, pack, tokenize, window_texts  # noqa: F401
from kd.data.sources import config_sources, expand_files  # noqa: F401
