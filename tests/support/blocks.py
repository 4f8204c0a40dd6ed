"""Blocks small enough that short test sequences span several."""

from keras_softmax.attention import BlockSizes

# Two queries and two keys a block: a sequence of 3 or more spans several,
# the last one padded where its length is odd.
SMALL = BlockSizes(query=2, key=2)
# `flash_attention=True` with SMALL blocks: the blocks wherever the call
# allows (on eager PyTorch, its SDPA where it gives our result).
SMALL_BLOCKS = {"flash_attention": True, "block_sizes": SMALL}
