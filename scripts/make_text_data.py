"""Regenerate data/calibration.txt and data/evaluation.txt (run with any Python 3.11).

Source: the Python Language Reference topics that CPython ships as `pydoc_data.topics`
(Python documentation, PSF License Version 2, which permits redistribution with its
notice). Topics alternate between the two files, so calibration and evaluation never
share a document. Documents are separated by a line holding only a form feed.
"""

from pathlib import Path
from pydoc_data.topics import topics

out = Path(__file__).resolve().parent.parent / "data"
keys = sorted(topics)
for name, parity in (("calibration.txt", 0), ("evaluation.txt", 1)):
    docs = [topics[k].strip() for i, k in enumerate(keys) if i % 2 == parity]
    (out / name).write_text("\n\f\n".join(docs) + "\n", encoding="utf-8")
    print(f"{name}: {len(docs)} documents, {sum(map(len, docs))} characters")
