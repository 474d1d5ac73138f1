"""Chain operations as qemu-img names them: commit, rebase, compare, measure, resize.

They work on fvd, qcow2 and raw images and any chain of them (an fvd overlay over a
qcow2 backing file, and so on), and read only what the maps say holds data: holes are
never read. Layer 12, over convert (measure uses convert's changed ranges). Modules: `layers`
(the chain of files, shared helpers), `commit`, `rebase`, `compare`, `measure`, `resize`.

* commit(top): the data the top (and, with base=, the layers between) holds is written
  into the backing file, then the top is emptied (qemu-img commit; -d keeps it).
* rebase(image, backing): safe mode copies into the image what would read differently
  through the new backing file, then the header names it; unsafe only the header.
* compare(a, b): qemu-img compare's result and messages.
* measure(image): qemu-img measure's `required` and `fully-allocated` for a conversion.
* resize(path, size): `Image.resize` / `Qcow2Image.resize` by file name.
"""

from fvd.chain.commit import commit
from fvd.chain.compare import Comparison, compare, compare_images
from fvd.chain.layers import Layer, backing_of, chain_of
from fvd.chain.measure import measure, qcow2_prealloc_size
from fvd.chain.rebase import rebase
from fvd.chain.resize import resize

__all__ = [
    "Comparison",
    "Layer",
    "backing_of",
    "chain_of",
    "commit",
    "compare",
    "compare_images",
    "measure",
    "qcow2_prealloc_size",
    "rebase",
    "resize",
]
