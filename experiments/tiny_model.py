"""Build a small random-weight Llama plus a locally trained tokenizer into a directory.

No model hub is needed: the weights are drawn from a seeded generator and the tokenizer is a
byte-level BPE trained with `tokenizers` on seeded synthetic text, wrapped in
`PreTrainedTokenizerFast`. The directory loads in vLLM (and transformers) like any local model, in
fp32 or bf16, with deterministic greedy output.

    python -m lmcache_lab.experiments.tiny_model /tmp/tiny-llama --layers 6 --hidden 512

`build_tiny_mla_model` builds a DeepSeek-V2-style model with multi-head latent attention (MLA)
the same way (`TinyMLASpec`, same tokenizer), for vLLM's MLA backends.

Invariants:
  * Deterministic: the same `TinyModelSpec` always gives the same weights and tokenizer.
  * Reused: a directory already holding a model of the same spec (see `SPEC_FILE`) is returned as
    it is; a different spec in the same directory is rebuilt.
  * `vocab_size` of the model equals the tokenizer's real vocabulary, so every id the model can
    emit decodes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPEC_FILE = "lmcache_lab_tiny_model.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the model. Defaults: about 40M parameters, 6 layers, KV of 12 KiB/token in fp32."""
    layers: int = 6
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 2048
    vocab: int = 16384          # target BPE vocabulary; the model uses the trained size
    max_position: int = 16384
    seed: int = 0

    def __post_init__(self):
        assert self.layers > 0 and self.hidden > 0 and self.intermediate > 0
        assert self.hidden % self.heads == 0, "hidden must be divisible by heads"
        assert self.heads % self.kv_heads == 0, "heads must be divisible by kv_heads"
        assert self.vocab >= 512, "vocab must leave room for the 256 byte tokens and merges"


def _corpus(seed: int, lines: int = 20000) -> list[str]:
    """Seeded synthetic text: pseudo-words from syllables, so BPE finds plenty of merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "st", "tr", "ch", "sh", "th", "pl", "gr", "br"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                     for _ in range(rng.randint(1, 3))) for _ in range(6000)]
    punct = [".", ",", "!", "?", ";", ":"]
    out = []
    for _ in range(lines):
        n = rng.randint(5, 25)
        s = " ".join(rng.choice(words) for _ in range(n))
        out.append(s.capitalize() + rng.choice(punct) + (" " + str(rng.randint(0, 9999)) if rng.random() < 0.2 else ""))
    return out


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _save_model_dir(path: Path, model, tokenizer, spec) -> Path:
    """Save `model` + `tokenizer` + the spec marker next to `path` and rename into place, so a
    reader never sees half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(spec)))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _built(path: Path, spec) -> bool:
    """True if `path` holds a finished build of `spec` (its marker matches); an unreadable marker
    means a rebuild."""
    marker = path / SPEC_FILE
    try:
        return marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(asdict(spec)))
    except (OSError, ValueError):
        return False


def build_tiny_model(path: str | os.PathLike, spec: TinyModelSpec | None = None) -> Path:
    """Build (or reuse) a tiny Llama under `path`; returns the directory."""
    spec = spec or TinyModelSpec()
    path = Path(path)
    if _built(path, spec):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_position,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    return _save_model_dir(path, model, tokenizer, spec)


@dataclass(frozen=True)
class TinyMLASpec:
    """Shape of a small DeepSeek-V2-style model with multi-head latent attention (MLA), all dense
    MLPs (no MoE). vLLM's CPU MLA backend (`CPU_MLA`, the one chosen without AMX) only serves a
    latent cache of width `kv_lora_rank + qk_rope_head_dim` = 576 (`get_supported_head_sizes`,
    vllm/v1/attention/backends/mla/cpu_mla.py), so those two keep DeepSeek's sizes (512 + 64):
    the KV is 576 values per token and layer whatever `hidden` is."""
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    intermediate: int = 512
    vocab: int = 4096           # target BPE vocabulary; the model uses the trained size
    max_position: int = 4096
    # weight init std (transformers' initializer_range): wider than the usual 0.02 so greedy
    # tokens have clear logit margins and fp32 rounding (a prefill split at a cached prefix)
    # does not flip them
    init_std: float = 0.1
    # "yarn" (factor 1: plain RoPE frequencies), as DeepSeek-V2 ships: vLLM then rotates with
    # DeepseekScalingRotaryEmbedding (torch). "default" takes vLLM's CPU `ops.rotary_embedding`,
    # whose non-neox output for a position changes with the number of tokens in the step
    # (measured on vLLM 0.32: rows 57-77 of a 512- vs a 700-token prefill), so a prefix's KV
    # depends on how it was batched and no cache can reproduce a cold prefill exactly.
    rope: str = "yarn"
    seed: int = 0

    def __post_init__(self):
        assert self.layers > 0 and self.hidden > 0 and self.intermediate > 0 and self.heads > 0
        assert self.vocab >= 512, "vocab must leave room for the 256 byte tokens and merges"


def _mla_rope(spec: TinyMLASpec) -> dict:
    if spec.rope == "default":
        return {"rope_type": "default", "rope_theta": 10000.0}
    if spec.rope == "yarn":
        return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                "original_max_position_embeddings": spec.max_position, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    raise ValueError(f"TinyMLASpec.rope: {spec.rope!r} is not one of default, yarn")


def build_tiny_mla_model(path: str | os.PathLike, spec: TinyMLASpec | None = None) -> Path:
    """Build (or reuse) a tiny random DeepSeek-V2-style MLA model under `path`, with the same
    local tokenizer as `build_tiny_model` (trained with the same seed and vocabulary size);
    returns the directory. Same invariants as `build_tiny_model` (deterministic, reused when the
    spec matches)."""
    spec = spec or TinyMLASpec()
    path = Path(path)
    if _built(path, spec):
        return path
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tokenizer = _train_tokenizer(TinyModelSpec(vocab=spec.vocab, seed=spec.seed))
    config = DeepseekV2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=spec.max_position,
        kv_lora_rank=spec.kv_lora_rank, q_lora_rank=None,
        qk_rope_head_dim=spec.qk_rope_head_dim, qk_nope_head_dim=spec.qk_nope_head_dim,
        v_head_dim=spec.v_head_dim, head_dim=spec.qk_rope_head_dim,
        first_k_dense_replace=spec.layers,          # every layer dense: no MoE
        n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,   # unused: no MoE layer
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_parameters=_mla_rope(spec), initializer_range=spec.init_std,
        tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(spec.seed)
    model = DeepseekV2ForCausalLM(config)
    return _save_model_dir(path, model, tokenizer, spec)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_lora(path: str | os.PathLike, model_dir: str | os.PathLike, rank: int = 8,
                    alpha: int = 16, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                    scale: float = 1.0, seed: int = 0) -> Path:
    """Write a random LoRA adapter for the tiny Llama in `model_dir`, in PEFT's file format
    (`adapter_config.json` + `adapter_model.safetensors`); returns `path`.

    Every `targets` projection of every layer gets `lora_A` [rank, in] and `lora_B` [out, rank],
    seeded. PEFT initialises `lora_B` to zero (a no-op adapter); here both are random, with
    `scale` sizing the update relative to the base weights (the update B @ A * alpha / rank has
    about `scale` times the base weights' standard deviation), so greedy outputs change.
    Deterministic: the same arguments give the same files (rewritten only when they differ).
    """
    import torch
    from safetensors.torch import save_file

    assert rank > 0 and set(targets) <= set(LORA_TARGETS), f"targets must be among {LORA_TARGETS}"
    model_dir, path = Path(model_dir), Path(path)
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
              "up_proj": (hidden, inter), "down_proj": (inter, hidden)}          # (in, out)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "base_model_name_or_path": str(model_dir),
              "lmcache_lab_lora": {"scale": scale, "seed": seed}}
    marker = path / "adapter_config.json"
    if marker.exists() and (path / "adapter_model.safetensors").exists():
        try:
            if json.loads(marker.read_text()) == config:
                return path
        except ValueError:
            pass  # unreadable: rewrite below
    base_std = cfg.get("initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name in sorted(targets):
            fan_in, fan_out = shapes[name]
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            # (B @ A)[o, i] = sum of `rank` products: std(A) * std(B) * sqrt(rank) * alpha / rank
            a = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5               # [r, in]
            b_std = scale * base_std * fan_in ** 0.5 * rank ** 0.5 / alpha
            b = torch.randn(fan_out, rank, generator=gen) * b_std                        # [out, r]
            tensors[prefix + ".lora_A.weight"] = a.contiguous()
            tensors[prefix + ".lora_B.weight"] = b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / "adapter_model.safetensors")
    marker.write_text(json.dumps(config, indent=1))
    return path


def num_parameters(spec: TinyModelSpec, vocab: int | None = None) -> int:
    """Parameter count of the Llama built from `spec` (untied embeddings, no biases)."""
    v = vocab or spec.vocab
    head_dim = spec.hidden // spec.heads
    attn = spec.hidden * spec.hidden * 2 + spec.hidden * spec.kv_heads * head_dim * 2
    mlp = 3 * spec.hidden * spec.intermediate
    norms = 2 * spec.hidden
    return spec.layers * (attn + mlp + norms) + 2 * v * spec.hidden + spec.hidden


@dataclass(frozen=True)
class TinyWindowSpec:
    """A tiny Llama whose attention layers use a sliding window. `layer_types` names each layer
    `"sliding_attention"` or `"full_attention"` (HF's per-layer spelling, which vLLM's Llama reads,
    vllm/model_executor/models/llama.py); empty means every layer slides. Alternating kinds make a
    hybrid model in the Gemma 2/3 pattern; all sliding is the Mistral-7B-v0.1 pattern."""
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 4096           # target BPE vocabulary; the model uses the trained size
    max_position: int = 4096
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        assert self.sliding_window > 0 and self.hidden % self.heads == 0
        assert not self.layer_types or len(self.layer_types) == self.layers
        assert set(self.layer_types) <= {"sliding_attention", "full_attention"}


def build_tiny_window_model(path: str | os.PathLike, spec: TinyWindowSpec | None = None) -> Path:
    """Build (or reuse) a tiny random sliding-window Llama under `path`, with the same local
    tokenizer as `build_tiny_model` (same seed and vocabulary size); returns the directory. Same
    invariants as `build_tiny_model` (deterministic, reused when the spec matches)."""
    spec = spec or TinyWindowSpec()
    path = Path(path)
    if _built(path, spec):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(TinyModelSpec(vocab=spec.vocab, seed=spec.seed))
    layer_types = list(spec.layer_types) or ["sliding_attention"] * spec.layers
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_position,
        sliding_window=spec.sliding_window, layer_types=layer_types,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    return _save_model_dir(path, model, tokenizer, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    d = TinyModelSpec()
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_position", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    args = p.parse_args(argv)
    spec = TinyModelSpec(**{k: v for k, v in vars(args).items() if k != "path"})
    out = build_tiny_model(args.path, spec)
    print(f"{out} ({num_parameters(spec) / 1e6:.1f}M parameters, {spec.layers} layers)")


if __name__ == "__main__":
    main()
