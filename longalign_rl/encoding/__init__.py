"""Segment-level prompt encoding (docs/method.md section 1) and the offline CLIP tokenizer.
Pure torch: no ray, no deepspeed."""

from longalign_rl.encoding.encode import SegmentEncoder, TruncatedEncoder, encode_prompts, pad_vector
from longalign_rl.encoding.segments import split_segments, split_sentences
from longalign_rl.encoding.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, check_clip_tokenizer, token_counter

__all__ = [
    "CLIP_VOCAB_SIZE",
    "SegmentEncoder",
    "TruncatedEncoder",
    "build_clip_tokenizer",
    "check_clip_tokenizer",
    "encode_prompts",
    "pad_vector",
    "split_segments",
    "split_sentences",
    "token_counter",
]
