"""Offline building blocks of the examples (and of the TRL tests): a random-weight Llama from a
config and a word-level tokenizer (nothing is downloaded), and small synthetic datasets."""
import torch

WORDS = "the a cat dog sat ran on mat rug big small red blue yes no why how good bad very".split()
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def model(seed=0, hidden=32, vocab=None, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab or len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                   **config)
    return transformers.LlamaForCausalLM(cfg)


def preference_data(n=8):
    import datasets

    prompts = ["the cat sat on", "a dog ran on", "why the big", "how a small", "the red cat", "a blue dog",
               "why no", "how very"]
    chosen = [" the mat", " the rug", " red dog", " blue cat", " sat on", " ran on", " yes yes", " good good"]
    rejected = [" a dog", " yes no", " no no", " the the", " bad bad", " no why", " how how", " bad very"]
    return datasets.Dataset.from_dict({"prompt": prompts[:n], "chosen": chosen[:n], "rejected": rejected[:n]})


def unpaired_data():
    import datasets

    p = preference_data()
    rows = {"prompt": list(p["prompt"]) * 2, "completion": list(p["chosen"]) + list(p["rejected"]),
            "label": [True] * len(p) + [False] * len(p)}
    return datasets.Dataset.from_dict(rows)


def prompt_data():
    import datasets

    return datasets.Dataset.from_dict({"prompt": list(preference_data()["prompt"])})


def text_data():
    import datasets

    p = preference_data()
    return datasets.Dataset.from_dict({"text": [a + b for a, b in zip(p["prompt"], p["chosen"])]})


def length_reward(completions, **kwargs):
    """A deterministic reward: longer completions score higher."""
    return [float(len(c)) for c in completions]


def common_args(out: str, steps: int, lr: float = 3e-3) -> dict:
    """TrainingArguments shared by the examples: CPU, fp32, no saving, no reporting."""
    return dict(output_dir=out, max_steps=steps, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                learning_rate=lr, seed=0, bf16=False)
