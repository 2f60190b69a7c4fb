"""Images -> features: the plan of a pass, the batched forward (stage blocks, augmented and
test-time views, channels_last, compiled graphs kept between runs, int8), the memory allocator
policy, torchrun sharding, and the decoded-image store that fine-tuning shares.

``pipeline`` plans and runs one extraction into the cache; ``features`` loads the features of
a data set (extracting when needed). Importing this package imports nothing heavy; its
modules import torch.
"""
