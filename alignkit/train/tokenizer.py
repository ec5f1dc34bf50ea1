"""Tokenizers made offline: built from a vocabulary (the demo) or trained on local text (tests,
benches) with the ``tokenizers`` library in seconds. Both carry a chat template."""
from __future__ import annotations

from typing import Iterable, Optional

CHATML_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATML_SPECIALS = ["<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|tool|>", "<|end|>"]


def from_vocabulary(words: list, chat_template: str, out_dir: Optional[str] = None, *,
                    bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>"):
    """Word-level tokenizer over `words` (whitespace-split text); specials come first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate([pad, unk, bos, eos] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                  pad_token=pad, unk_token=unk)
    tok.chat_template = chat_template
    if out_dir:
        tok.save_pretrained(out_dir)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 4000, out_dir: Optional[str] = None,
              chat_template: str = CHATML_TEMPLATE):
    """Byte-level BPE trained on `texts`, with ChatML-style role tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>",
                                  eos_token="<|endoftext|>")
    tok.chat_template = chat_template
    if out_dir:
        tok.save_pretrained(out_dir)
    return tok


def texts_of(rows) -> list:
    """Every string inside rows (any of the data shapes), for training a tokenizer."""
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(rows)
    return out
