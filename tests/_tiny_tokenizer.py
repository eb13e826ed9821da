"""A tiny word-level tokenizer with a chat template, built offline (no downloads)."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]
WORDS = ("what is the answer to and + - * ? . reason step by put your final within "
         "\\boxed{} please question : ####").split()


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + [str(d) for d in range(1000)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Like Llama's tokenizer: plain text gets a BOS; chat templates write their own specials.
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", additional_special_tokens=SPECIALS[4:])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
