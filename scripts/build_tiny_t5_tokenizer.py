"""Build the tiny T5 branch's tokenizer, longalign_rl/model_configs/tiny/t5_tokenizer/.

T5's real tokenizer is a SentencePiece Unigram model that cannot be downloaded here; the
tiny T5 (tests, the demo) needs one of the same kind. This trains a Unigram tokenizer with
T5's special tokens (<pad> = 0, </s> = 1, <unk> = 2; </s> appended to every text, as T5's)
on the demo prompts and ShapesWorld's captions, and saves it as a transformers tokenizer.
Training is not bit-reproducible across runs, so the result is shipped, not rebuilt: every
process must tokenise alike.

    .venv/bin/python scripts/build_tiny_t5_tokenizer.py
"""

from pathlib import Path

from tokenizers import SentencePieceUnigramTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from shapesworld.plugin import captions

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "longalign_rl" / "model_configs" / "tiny" / "t5_tokenizer"
VOCAB_SIZE = 512  # model_configs/tiny/t5_encoder.json's vocab_size


def main() -> None:
    texts = (ROOT / "longalign_rl" / "demo_prompts.txt").read_text().splitlines() + captions()[:200]
    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"],
                            unk_token="<unk>", show_progress=False)
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                      model_max_length=512)
    wrapped.save_pretrained(OUT)
    print(f"wrote {OUT}: {len(wrapped)} tokens")


if __name__ == "__main__":
    main()
