"""Segment-level prompt encoding (METHOD.md section 1). Pure torch: no ray, no deepspeed."""

from longalign_rl.encoding.encode import SegmentEncoder, TruncatedEncoder, encode_prompts, pad_vector
from longalign_rl.encoding.segments import split_segments, split_sentences, token_counter

__all__ = ["SegmentEncoder", "TruncatedEncoder", "encode_prompts", "pad_vector", "split_segments", "split_sentences", "token_counter"]
